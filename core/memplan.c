/* memplan.c: memory plans (memplan.h). The dry table's alloc hands out addresses that are never touched (every
 * other memory entry does nothing), so model_init sizes exactly what a run allocates without allocating it; the
 * table's prepare only records the plan the backend's own planner then sizes its scratch from. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "memplan.h"
#include "model.h"
#ifdef ML_HAVE_CUDA
#include "backend_cuda.h"
#endif

static struct {
    size_t bytes;           /* allocated through the table */
    uintptr_t next;         /* the next address handed out */
    ml_backend_plan prepared;
} dry;

static void *dry_alloc(size_t bytes) {
    bytes = bytes ? bytes : 64; /* as both real tables do */
    dry.bytes += bytes;
    void *p = (void *)dry.next;
    dry.next += (bytes + 255) / 256 * 256;
    return p;
}
static void dry_free(void *p) { (void)p; }
static void dry_fill(void *p, size_t bytes) { (void)p, (void)bytes; }
static void dry_copy(void *dst, const void *src, size_t bytes) { (void)dst, (void)src, (void)bytes; }
static void dry_sync(void) {}
static void dry_prepare(const ml_backend_plan *p) { dry.prepared = *p; }

int memory_plan(const ml_config *cfg, const char *backend, int B, ml_memory_plan *plan, ml_err *err) {
    memset(plan, 0, sizeof *plan);
    if (B < 1) return ml_errf(err, ML_EINPUT, "train.batch: %d sequences; must be at least 1", B);
    const int cuda = !strcmp(backend, "cuda"), cuda_fp32 = !strcmp(backend, "cuda-fp32");
    if (strcmp(backend, "cpu") && !cuda && !cuda_fp32)
        return ml_errf(err, ML_EINPUT, "--backend: '%s' is not cpu, cuda or cuda-fp32", backend);
    ml_backend table = {.name = backend, .alloc = dry_alloc, .free = dry_free, .memset0 = dry_fill,
                        .to_host = dry_copy, .from_host = dry_copy, .sync = dry_sync};
    if (cuda || cuda_fp32) {
#ifdef ML_HAVE_CUDA
        table.attention_state_floats = cuda_attention_state_floats;
        table.prepare = dry_prepare;
#else
        return ml_errf(err, ML_EINPUT, "--backend %s: this moelab was built without the CUDA backend", backend);
#endif
    } else {
        table.attention_state_floats = backend_cpu()->attention_state_floats;
    }
    memset(&dry, 0, sizeof dry);
    dry.next = (uintptr_t)1 << 44; /* far from any real mapping: a stray access faults at once */
    ml_model *m = calloc(1, sizeof *m);
    if (!m) return ml_errf(err, ML_ERUN, "out of host memory");
    int rc = model_init(m, cfg, &table, B, 0, err);
    if (rc) {
        free(m);
        return rc;
    }
    plan->state = 4 * sizeof(float) * m->nparams;
    plan->activations = dry.bytes - plan->state;
#ifdef ML_HAVE_CUDA
    if (cuda || cuda_fp32) cuda_plan_memory(&dry.prepared, m->nparams, cuda, &plan->scratch, &plan->weight_copy);
#endif
    model_free(m);
    free(m);
    return ML_OK;
}

size_t memory_plan_total(const ml_memory_plan *plan) {
    return plan->state + plan->weight_copy + plan->activations + plan->scratch;
}

int memory_plan_max_batch(const ml_config *cfg, const char *backend, size_t limit, int *max_B, ml_err *err) {
    /* the total grows with B: double until it no longer fits (or B x T nears the int range model.c indexes
     * tokens with), then bisect */
    ml_memory_plan plan;
    int fits = 0, over = 1, rc;
    const int cap = (1 << 26) / (cfg->model.seq_len > 0 ? cfg->model.seq_len : 1);
    while (1) {
        if ((rc = memory_plan(cfg, backend, over, &plan, err))) return rc;
        if (memory_plan_total(&plan) > limit) break;
        fits = over;
        if (over >= cap) return *max_B = fits, ML_OK;
        over = over * 2 < cap ? over * 2 : cap;
    }
    while (over - fits > 1) {
        const int mid = fits + (over - fits) / 2;
        if ((rc = memory_plan(cfg, backend, mid, &plan, err))) return rc;
        if (memory_plan_total(&plan) > limit) over = mid;
        else fits = mid;
    }
    *max_B = fits;
    return ML_OK;
}
