/* test_reference.c: the whole model against the PyTorch reference (tests/reference/make_fixtures.py).
 * Each fixture holds a config (model, balance.policy, train.accum), A micro-batches, initial parameters and
 * what float64 PyTorch computed from them: per micro-batch logits, CE and balancing loss, every parameter
 * gradient accumulated over the micro-batches, the loss over a few AdamW steps and the parameters after them.
 * This program builds the same model through model.h on the CPU backend, loads the parameters by tensor name,
 * replays the step as train.c does (begin_step, forward + backward(1/A) per micro-batch) and compares.
 * Usage: test_reference FIXTURE_DIR (every *.bin in it is a case). */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "config.h"
#include "model.h"

/* Tolerances. moelab computes in float32, the reference in float64; float32 PyTorch on the same fixtures
 * lands within 5e-6 of float64 on every measure below (make_fixtures.py --calibrate), so these leave a
 * margin of 20x or more for a different summation order; a formula error moves them by 1e-3 to 1.
 * Errors are max |c - ref| over a tensor divided by max |ref| over it (for scalars: relative error). */
#define TOL_FORWARD 1e-4 /* logits, CE loss, balancing loss */
#define TOL_GRAD 1e-3    /* each parameter gradient, per tensor */
#define TOL_STEPS 1e-4   /* total loss before each AdamW step */
#define TOL_FINAL 1e-3   /* each parameter after the AdamW steps, per tensor */

enum { DT_F32 = 0, DT_I32 = 1, DT_TEXT = 2 };

typedef struct {
    char name[64];
    uint32_t dtype, ndim, dims[4];
    size_t numel; /* elements; bytes for text */
    const void *data;
    int used;
} record;

typedef struct {
    unsigned char *buf;
    record *recs;
    int nrecs;
} fixture;

static int n_pass, n_fail;

static int read_u32(const unsigned char **p, const unsigned char *end, uint32_t *v) {
    if (end - *p < 4) return -1;
    *v = (uint32_t)(*p)[0] | (uint32_t)(*p)[1] << 8 | (uint32_t)(*p)[2] << 16 | (uint32_t)(*p)[3] << 24;
    *p += 4;
    return 0;
}

/* Reads and indexes a fixture file; returns 0, or -1 after printing why. */
static int fixture_load(fixture *fx, const char *path) {
    memset(fx, 0, sizeof *fx);
    FILE *f = fopen(path, "rb");
    if (!f) return fprintf(stderr, "%s: cannot open\n", path), -1;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    fx->buf = malloc(size > 0 ? (size_t)size : 1);
    if (size < 8 || fread(fx->buf, 1, (size_t)size, f) != (size_t)size) {
        fclose(f);
        return fprintf(stderr, "%s: short file\n", path), -1;
    }
    fclose(f);
    const unsigned char *p = fx->buf, *end = fx->buf + size;
    uint32_t version;
    if (memcmp(p, "MLFX", 4)) return fprintf(stderr, "%s: bad magic\n", path), -1;
    p += 4;
    read_u32(&p, end, &version);
    if (version != 1) return fprintf(stderr, "%s: version %u, expected 1\n", path, version), -1;
    int cap = 0;
    for (;;) {
        record r = {0};
        uint32_t len;
        if (read_u32(&p, end, &len) || len >= sizeof r.name || end - p < len)
            return fprintf(stderr, "%s: bad record name at byte %ld\n", path, (long)(p - fx->buf)), -1;
        memcpy(r.name, p, len);
        p += len;
        if (read_u32(&p, end, &r.dtype) || read_u32(&p, end, &r.ndim) || r.dtype > DT_TEXT || r.ndim > 4)
            return fprintf(stderr, "%s: bad header of record '%s'\n", path, r.name), -1;
        r.numel = 1;
        for (uint32_t i = 0; i < r.ndim; i++) {
            if (read_u32(&p, end, &r.dims[i])) return fprintf(stderr, "%s: truncated '%s'\n", path, r.name), -1;
            r.numel *= r.dims[i];
        }
        size_t bytes = r.dtype == DT_TEXT ? r.numel : 4 * r.numel;
        if ((size_t)(end - p) < bytes) return fprintf(stderr, "%s: truncated data of '%s'\n", path, r.name), -1;
        r.data = p;
        p += bytes;
        if (!strcmp(r.name, "end")) break;
        if (fx->nrecs == cap) {
            cap = cap ? 2 * cap : 64;
            fx->recs = realloc(fx->recs, sizeof(record) * cap);
        }
        fx->recs[fx->nrecs++] = r;
    }
    return 0;
}

static void fixture_free(fixture *fx) {
    free(fx->buf);
    free(fx->recs);
}

static record *find(fixture *fx, const char *name, uint32_t dtype) {
    for (int i = 0; i < fx->nrecs; i++)
        if (!strcmp(fx->recs[i].name, name)) return fx->recs[i].dtype == dtype ? &fx->recs[i] : NULL;
    return NULL;
}

/* The fixture's f32 data as a host array (records are not aligned in the file). */
static float *floats(const record *r) {
    float *v = malloc(sizeof(float) * (r->numel ? r->numel : 1));
    memcpy(v, r->data, sizeof(float) * r->numel);
    return v;
}

static void check(const char *cs, const char *what, double err, double tol) {
    int ok = err <= tol; /* NaN fails */
    printf("  %-4s %-34s err %.2e (tol %.0e)\n", ok ? "ok" : "FAIL", what, err, tol);
    ok ? n_pass++ : n_fail++;
    if (!ok) fprintf(stderr, "reference: %s: %s: error %.3e exceeds %.0e\n", cs, what, err, tol);
}

/* max |a - ref| / max |ref| over n values (absolute error if ref is all zero) */
static double rel_err(const float *a, const float *ref, size_t n) {
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]);
        if (!(e <= d)) d = e; /* keeps NaN */
        if (fabs(ref[i]) > s) s = fabs(ref[i]);
    }
    return s > 0 ? d / s : d;
}

static double scalar_err(double a, double ref) { return fabs(a - ref) / (fabs(ref) > 1e-30 ? fabs(ref) : 1); }

/* Compares each model tensor of arena (backend memory) with the fixture's "<prefix><name>" record. */
static void check_tensors(const char *cs, fixture *fx, ml_model *m, const float *arena, const char *prefix, double tol) {
    float *host = malloc(sizeof(float) * m->nparams);
    m->be->to_host(host, arena, sizeof(float) * m->nparams);
    for (int i = 0; i < m->ntensors; i++) {
        const ml_tensor *t = &m->tensors[i];
        char key[80], what[96];
        snprintf(key, sizeof key, "%s%s", prefix, t->name);
        snprintf(what, sizeof what, "%s", key);
        record *r = find(fx, key, DT_F32);
        if (!r || r->numel != t->numel) {
            check(cs, what, INFINITY, tol);
            fprintf(stderr, "reference: %s: record '%s' missing or of the wrong size\n", cs, key);
            continue;
        }
        float *ref = floats(r);
        check(cs, what, rel_err(host + t->offset, ref, t->numel), tol);
        free(ref);
    }
    free(host);
}

/* Copies every "param.<name>" record into the model; each tensor must be provided exactly once with its
 * shape, and every param record must name a model tensor. */
static int load_params(const char *cs, fixture *fx, ml_model *m) {
    float *host = calloc(m->nparams, sizeof(float));
    char *seen = calloc(m->ntensors, 1);
    int bad = 0;
    for (int i = 0; i < fx->nrecs; i++) {
        record *r = &fx->recs[i];
        if (strncmp(r->name, "param.", 6)) continue;
        const ml_tensor *t = model_tensor(m, r->name + 6);
        if (!t) {
            fprintf(stderr, "reference: %s: fixture tensor '%s' is not in the model\n", cs, r->name + 6);
            bad = 1;
            continue;
        }
        int same = r->dtype == DT_F32 && (int)r->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++) same = (int)r->dims[d] == t->shape[d];
        if (!same) {
            fprintf(stderr, "reference: %s: '%s' has a different shape in the fixture\n", cs, t->name);
            bad = 1;
            continue;
        }
        int ti = (int)(t - m->tensors);
        if (seen[ti]++) {
            fprintf(stderr, "reference: %s: '%s' given twice\n", cs, t->name);
            bad = 1;
        }
        memcpy(host + t->offset, r->data, sizeof(float) * t->numel);
    }
    for (int i = 0; i < m->ntensors; i++)
        if (!seen[i]) {
            fprintf(stderr, "reference: %s: model tensor '%s' missing from the fixture\n", cs, m->tensors[i].name);
            bad = 1;
        }
    m->be->from_host(m->params, host, sizeof(float) * m->nparams);
    free(host);
    free(seen);
    return bad ? -1 : 0;
}

/* Builds the case's config from its "config" record: preset tiny, then one key=value per line. */
static int make_config(const char *cs, fixture *fx, ml_config *cfg) {
    ml_err err = {0};
    record *r = find(fx, "config", DT_TEXT);
    if (!r) return fprintf(stderr, "reference: %s: no config record\n", cs), -1;
    if (config_preset(cfg, "tiny", &err)) return fprintf(stderr, "reference: %s: %s\n", cs, err.msg), -1;
    char *text = malloc(r->numel + 1);
    memcpy(text, r->data, r->numel);
    text[r->numel] = 0;
    int rc = 0;
    for (char *line = strtok(text, "\n"); line && !rc; line = strtok(NULL, "\n"))
        if ((rc = config_set(cfg, line, &err))) fprintf(stderr, "reference: %s: %s\n", cs, err.msg);
    free(text);
    if (!rc && (rc = config_validate(cfg, &err))) fprintf(stderr, "reference: %s: %s\n", cs, err.msg);
    return rc ? -1 : 0;
}

/* The number of micro-batches A of a tokens/targets record: (A, B, T), or (B, T) for A = 1; -1 if it does not
 * hold B x T sequences. */
static int micro_batches(const record *r, int B, int T) {
    if (r->ndim == 2 && (int)r->dims[0] == B && (int)r->dims[1] == T) return 1;
    if (r->ndim == 3 && r->dims[0] >= 1 && (int)r->dims[1] == B && (int)r->dims[2] == T) return (int)r->dims[0];
    return -1;
}

/* One optimizer step's gradient as train.c builds it: zero, model_begin_step, then per micro-batch a forward
 * and model_backward(1/A). With the fixture's records (ref_* non-NULL) each micro-batch's logits, CE and
 * balancing loss are checked. Returns the step's mean of CE + balancing loss over the micro-batches. */
static double accumulate_step(const char *cs, ml_model *m, int A, uint64_t tokens_seen, const int32_t *tokens,
                              const int32_t *targets, const float *ref_logits, const float *ref_loss,
                              const float *ref_aux) {
    const int M = m->B * m->T, V = m->V;
    float *logits = ref_logits ? malloc(sizeof(float) * M * V) : NULL;
    double total = 0;
    model_zero_grad(m);
    model_begin_step(m, tokens_seen);
    for (int j = 0; j < A; j++) {
        float ce = model_forward(m, tokens + (size_t)j * M, targets + (size_t)j * M);
        total += ((double)ce + m->last_aux) / A;
        if (ref_logits) {
            char at[32] = "", what[64];
            if (A > 1) snprintf(at, sizeof at, " micro-batch %d", j + 1);
            m->be->to_host(logits, m->logits, sizeof(float) * M * V);
            snprintf(what, sizeof what, "logits%s", at);
            check(cs, what, rel_err(logits, ref_logits + (size_t)j * M * V, (size_t)M * V), TOL_FORWARD);
            snprintf(what, sizeof what, "loss (cross-entropy)%s", at);
            check(cs, what, scalar_err(ce, ref_loss[j]), TOL_FORWARD);
            snprintf(what, sizeof what, "aux_loss (balancing)%s", at);
            check(cs, what, scalar_err(m->last_aux, ref_aux[j]), TOL_FORWARD);
        }
        model_backward(m, 1.0f / A);
    }
    free(logits);
    return total;
}

static void run_case(const char *dir, const char *file) {
    char path[1024], cs[256];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    snprintf(cs, sizeof cs, "%.*s", (int)(strlen(file) - 4), file);
    printf("case %s\n", cs);
    fixture fx;
    ml_config cfg;
    ml_model m;
    ml_err err = {0};
    if (fixture_load(&fx, path) || make_config(cs, &fx, &cfg)) {
        fixture_free(&fx);
        n_fail++;
        return;
    }
    const int B = cfg.train.batch, T = cfg.model.seq_len, V = cfg.model.vocab, L = cfg.model.layers, M = B * T;
    record *tok = find(&fx, "tokens", DT_I32), *tgt = find(&fx, "targets", DT_I32);
    const int A = tok ? micro_batches(tok, B, T) : -1;
    record *rlogits = find(&fx, "logits", DT_F32), *rloss = find(&fx, "loss", DT_F32);
    record *raux = find(&fx, "aux_loss", DT_F32), *radam = find(&fx, "adamw", DT_F32);
    record *rsteps = find(&fx, "step_losses", DT_F32);
    record *rlayers = find(&fx, "aux_layers", DT_F32); /* optional: fixtures before the policy cases lack it */
    if (A < 1 || !tgt || micro_batches(tgt, B, T) != A || !rlogits || rlogits->numel != (size_t)A * M * V ||
        !rloss || rloss->numel != (size_t)A || !raux || raux->numel != (size_t)A || !radam || radam->numel != 5 ||
        !rsteps || (rlayers && rlayers->numel != (size_t)L)) {
        fprintf(stderr, "reference: %s: a record is missing or has the wrong size\n", cs);
        fixture_free(&fx);
        n_fail++;
        return;
    }
    if (model_init(&m, &cfg, backend_cpu(), B, 0, &err)) {
        fprintf(stderr, "reference: %s: model_init: %s\n", cs, err.msg);
        fixture_free(&fx);
        n_fail++;
        return;
    }
    int32_t *tokens = malloc(sizeof(int32_t) * A * M), *targets = malloc(sizeof(int32_t) * A * M);
    memcpy(tokens, tok->data, sizeof(int32_t) * A * M);
    memcpy(targets, tgt->data, sizeof(int32_t) * A * M);
    float *adam = floats(radam), *ref = floats(rlogits), *steps = floats(rsteps);
    float *ref_loss = floats(rloss), *ref_aux = floats(raux);

    /* the optimizer hyperparameters and the accumulation come from the config; the fixture must agree */
    int adam_ok = adam[1] == cfg.train.beta1 && adam[2] == cfg.train.beta2 && adam[3] == cfg.train.eps &&
                  adam[4] == cfg.train.weight_decay;
    check(cs, "adamw hyperparameters match config", adam_ok ? 0 : INFINITY, 0);
    check(cs, "train.accum matches the micro-batches", A == cfg.train.accum ? 0 : INFINITY, 0);
    check(cs, "parameters loaded by name", load_params(cs, &fx, &m) ? INFINITY : 0, 0);

    /* one step's accumulated gradient of sum_j (CE_j + balancing_j) / A */
    accumulate_step(cs, &m, A, 0, tokens, targets, ref, ref_loss, ref_aux);
    check_tensors(cs, &fx, &m, m.grads, "grad.", TOL_GRAD);
    if (rlayers) {
        /* each block's balancing loss, summed over the step's micro-batches (0 for dense blocks) */
        float *ref_layers = floats(rlayers), got[ML_MAX_LAYERS];
        for (int l = 0; l < L; l++) got[l] = (float)m.stats.policy_loss[l];
        check(cs, "aux_loss per block (route stats)", rel_err(got, ref_layers, L), TOL_FORWARD);
        free(ref_layers);
    }

    /* AdamW from the fixture's initial parameters again (the step above changed none), each step accumulating
     * the same A micro-batches */
    for (int t = 1; t <= (int)rsteps->numel; t++) {
        double total = accumulate_step(cs, &m, A, (uint64_t)(t - 1) * A * M, tokens, targets, NULL, NULL, NULL);
        model_adamw(&m, adam[0], 1.0f, t);
        char what[64];
        snprintf(what, sizeof what, "step %d loss (CE + aux) %.6f", t, total);
        check(cs, what, scalar_err(total, steps[t - 1]), TOL_STEPS);
    }
    check_tensors(cs, &fx, &m, m.params, "final.", TOL_FINAL);

    free(tokens), free(targets), free(adam), free(ref), free(steps), free(ref_loss), free(ref_aux);
    model_free(&m);
    fixture_free(&fx);
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FIXTURE_DIR\n", argv[0]);
        return 2;
    }
    DIR *d = opendir(argv[1]);
    if (!d) {
        fprintf(stderr, "reference: cannot open fixture directory %s\n", argv[1]);
        return 1;
    }
    char *files[256];
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) && n < 256;) {
        size_t len = strlen(e->d_name);
        if (len > 4 && !strcmp(e->d_name + len - 4, ".bin")) files[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(files, n, sizeof files[0], by_name);
    if (n == 0) {
        fprintf(stderr, "reference: no *.bin fixtures in %s\n", argv[1]);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        run_case(argv[1], files[i]);
        free(files[i]);
    }
    printf("reference: %d cases, %d checks passed, %d failed\n", n, n_pass, n_fail);
    return n_fail ? 1 : 0;
}
