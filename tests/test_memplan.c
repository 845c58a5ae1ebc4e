/* test_memplan.c: moelab plan's memory plans. On the CPU a plan must equal what model_init really allocates
 * through the CPU table (counted by a wrapper), for models with and without the optional parts; the largest
 * batch that fits must fit while one more does not; bad requests are refused. (The CUDA tables' plans are
 * checked against what the emulated device holds after real steps: tests/emu/test_train_emu.sh.) */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "memplan.h"
#include "model.h"

static const ml_backend *cpu;
static size_t counted;
static void *counting_alloc(size_t bytes) {
    counted += bytes ? bytes : 64; /* as the CPU table allocates a zero-byte request */
    return cpu->alloc(bytes);
}

/* bytes model_init allocates through the real CPU table for cfg and B */
static size_t real_bytes(const ml_config *cfg, int B) {
    ml_backend table = *cpu;
    table.alloc = counting_alloc;
    counted = 0;
    ml_model *m = calloc(1, sizeof *m);
    ml_err err = {0};
    int rc = model_init(m, cfg, &table, B, 0, &err);
    CHECK(rc == ML_OK, "model_init: %s", err.msg);
    size_t bytes = counted;
    if (!rc) model_free(m);
    free(m);
    return bytes;
}

static void config(ml_config *cfg, const char *preset, const char **sets) {
    ml_err err = {0};
    config_preset(cfg, preset, &err);
    for (int i = 0; sets && sets[i]; i++) CHECK(!config_set(cfg, sets[i], &err), "%s: %s", sets[i], err.msg);
    CHECK(!config_validate(cfg, &err), "%s: %s", preset, err.msg);
}

static void plan_equals_allocation(const char *what, const char *preset, const char **sets, int B) {
    ml_config cfg;
    config(&cfg, preset, sets);
    ml_memory_plan plan;
    ml_err err = {0};
    CHECK(!memory_plan(&cfg, "cpu", B, &plan, &err), "%s: %s", what, err.msg);
    const size_t real = real_bytes(&cfg, B);
    CHECK(memory_plan_total(&plan) == real, "%s, B %d: planned %zu bytes, model_init allocated %zu", what, B,
          memory_plan_total(&plan), real);
    CHECK(plan.state == 16 * model_param_count(&cfg), "%s: state %zu bytes for %zu parameters", what, plan.state,
          model_param_count(&cfg));
    CHECK(plan.weight_copy == 0 && plan.scratch == 0, "%s: the CPU has no weight copy or scratch", what);
}

int main(void) {
    cpu = backend_cpu();
    plan_equals_allocation("tiny", "tiny", NULL, 3);
    plan_equals_allocation("tiny", "tiny", NULL, 1);
    const char *dense_shared[] = {"model.dense_layers=1", "model.dense_ffn=96", "model.shared_experts=1", "model.shared_ffn=48",
                                  "model.qk_norm=false", "model.tie_embeddings=false", NULL};
    plan_equals_allocation("dense first layer, shared expert, untied", "tiny", dense_shared, 2);
    const char *policies[] = {"balance.policy=aux_loss+topk_schedule+capacity",
                              "balance.topk_stages=[{layers: \"[3]*2\", until_tokens: 1e6}, {layers: \"[1]*2\"}]",
                              "balance.capacity_factor=1.25", NULL};
    plan_equals_allocation("k up to 3 by schedule, capacity", "tiny", policies, 2);
    plan_equals_allocation("small-cpu", "small-cpu", NULL, 2);

    /* activations grow with the micro-batch, the state does not */
    ml_config cfg;
    config(&cfg, "small-cpu", NULL);
    ml_memory_plan one, two;
    ml_err err = {0};
    CHECK(!memory_plan(&cfg, "cpu", 1, &one, &err) && !memory_plan(&cfg, "cpu", 2, &two, &err), "%s", err.msg);
    CHECK(two.state == one.state && two.activations > one.activations, "state %zu/%zu, activations %zu/%zu",
          one.state, two.state, one.activations, two.activations);

    /* the largest batch that fits: it fits, one more does not */
    const size_t limit = one.state + 5 * (two.activations - one.activations) + one.activations / 2;
    int max_B = -1;
    CHECK(!memory_plan_max_batch(&cfg, "cpu", limit, &max_B, &err), "%s", err.msg);
    ml_memory_plan at, above;
    CHECK(max_B >= 1 && !memory_plan(&cfg, "cpu", max_B, &at, &err) && !memory_plan(&cfg, "cpu", max_B + 1, &above, &err),
          "max batch %d", max_B);
    CHECK(memory_plan_total(&at) <= limit && memory_plan_total(&above) > limit,
          "max batch %d: %zu bytes, %d: %zu, limit %zu", max_B, memory_plan_total(&at), max_B + 1,
          memory_plan_total(&above), limit);
    CHECK(!memory_plan_max_batch(&cfg, "cpu", one.state, &max_B, &err) && max_B == 0,
          "nothing fits in the state alone: %d", max_B);

    /* refusals */
    CHECK(memory_plan(&cfg, "cpu", 0, &one, &err) == ML_EINPUT && strstr(err.msg, "train.batch"), "B 0: %s", err.msg);
    CHECK(memory_plan(&cfg, "tpu", 1, &one, &err) == ML_EINPUT && strstr(err.msg, "tpu"), "tpu: %s", err.msg);
#ifdef ML_HAVE_CUDA
    /* planned without a GPU: the bf16 table adds a 2-byte copy of every weight and its workspace */
    ml_memory_plan fp32, bf16;
    CHECK(!memory_plan(&cfg, "cuda-fp32", 2, &fp32, &err) && !memory_plan(&cfg, "cuda", 2, &bf16, &err), "%s",
          err.msg);
    CHECK(bf16.weight_copy == 2 * model_param_count(&cfg) && fp32.weight_copy == 0, "weight copies %zu, %zu",
          bf16.weight_copy, fp32.weight_copy);
    CHECK(bf16.scratch > fp32.scratch && fp32.scratch > 0, "scratch %zu, %zu", bf16.scratch, fp32.scratch);
    /* flash-style attention keeps 2 floats per query row and head, the CPU the (T x T) probabilities */
    CHECK(bf16.activations < two.activations, "cuda activations %zu, cpu %zu", bf16.activations, two.activations);
#else
    CHECK(memory_plan(&cfg, "cuda", 1, &one, &err) == ML_EINPUT && strstr(err.msg, "without the CUDA"), "%s",
          err.msg);
#endif
    printf("memplan: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
