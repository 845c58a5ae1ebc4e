/* test_config.c: presets validate; overrides parse; impossible configs and bad values are rejected with the
 * key named; list expressions expand; config.yaml round-trips. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "model.h"

#include "check.h"

/* Applies assignments to the tiny preset and expects validation to fail mentioning `want`. */
static void expect_reject(const char *want, int n, const char *const *assignments) {
    ml_config c;
    ml_err err = {0};
    config_preset(&c, "tiny", NULL);
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) rc = config_set(&c, assignments[i], &err);
    if (!rc) rc = config_validate(&c, &err);
    CHECK(rc == ML_EINPUT && strstr(err.msg, want), "%s: expected rejection naming '%s', got rc=%d '%s'",
          assignments[0], want, rc, err.msg);
}
#define REJECT(want, ...) expect_reject(want, sizeof((const char *[]){__VA_ARGS__}) / sizeof(char *), \
                                        (const char *const[]){__VA_ARGS__})

int main(void) {
    ml_err err = {0};
    for (int i = 0; config_preset_names[i]; i++) {
        ml_config c;
        CHECK(config_preset(&c, config_preset_names[i], &err) == 0, "preset %s", config_preset_names[i]);
        CHECK(config_validate(&c, &err) == 0, "preset %s validates: %s", config_preset_names[i], err.msg);
    }
    /* sigma-tiny-full: 56 x 96 x 3 x 1536 x 768 = 19.0B expert parameters (PAPER.md), ~20B total */
    ml_config full;
    config_preset(&full, "sigma-tiny-full", NULL);
    double n = (double)model_param_count(&full);
    CHECK(n > 19.5e9 && n < 20.5e9, "sigma-tiny-full has %.3gB parameters, expected ~20B", n / 1e9);
    double active = model_active_params(&full);
    CHECK(active > 0.4e9 && active < 0.75e9, "sigma-tiny-full active %.3gB, expected ~0.5B", active / 1e9);
    CHECK(full.model.experts == 96 && full.model.top_k == 1 && full.model.layers == 56 && full.model.dim == 1536,
          "sigma-tiny-full shape");
    ml_config small;
    config_preset(&small, "small-cpu", NULL);
    CHECK(small.model.experts == 96 && small.model.top_k == 1, "small-cpu is 96 experts top-1");

    ml_config c;
    config_preset(&c, "tiny", NULL);
    CHECK(config_set(&c, "preset=small-cpu", &err) == 0 && c.model.experts == 96, "preset= override");
    CHECK(config_set(&c, "model.experts=32", &err) == 0 && c.model.experts == 32, "int override");
    CHECK(config_set(&c, "train.lr=1e-3", &err) == 0 && c.train.lr == 1e-3f, "float override");
    CHECK(config_set(&c, "model.qk_norm=false", &err) == 0 && c.model.qk_norm == 0, "bool override");
    CHECK(config_set(&c, "model.score=sigmoid", &err) == 0 && c.model.score == SCORE_SIGMOID, "enum override");
    CHECK(config_set(&c, "seed=3", &err) == 0 && c.seed == 3, "seed override");
    CHECK(config_set(&c, "train.steps=2e3", &err) == 0 && c.train.steps == 2000, "1e3-style int");

    REJECT("model.bogus", "model.bogus=1");
    REJECT("model.experts", "model.experts=many");
    REJECT("train.lr", "train.lr=nan");
    REJECT("model.qk_norm", "model.qk_norm=maybe");
    REJECT("model.score", "model.score=relu");
    REJECT("model.top_k", "model.top_k=9");                      /* k > experts (tiny has 8) */
    REJECT("model.heads", "model.heads=3");                      /* 64 not divisible by 3 */
    REJECT("model.kv_heads", "model.kv_heads=3");                /* does not divide 4 heads */
    REJECT("model.layer_top_k", "model.layer_top_k=[2]*3");      /* 3 entries, 2 layers */
    REJECT("model.layer_top_k", "model.layer_top_k=[2]*1+[9]");  /* 9 > experts */
    REJECT("model.layer_top_k", "model.layer_top_k=[2]*x");
    REJECT("train.batch", "train.batch=0");
    REJECT("train.beta2", "train.beta2=1");
    REJECT("model.dense_ffn", "model.dense_layers=1");
    REJECT("model.softmax_order", "model.score=sigmoid", "model.softmax_order=after");
    REJECT("preset", "preset=huge");
    REJECT("key=value", "notanassignment");

    int k[ML_MAX_LAYERS];
    CHECK(parse_int_list_expr("[2]*8+[1]*48", k, ML_MAX_LAYERS, &err) == 56 && k[7] == 2 && k[8] == 1 && k[55] == 1,
          "[2]*8+[1]*48");
    CHECK(parse_int_list_expr("[1, 2,3]", k, ML_MAX_LAYERS, &err) == 3 && k[1] == 2, "[1, 2,3]");
    CHECK(parse_int_list_expr("[1,2]*2+[3]", k, ML_MAX_LAYERS, &err) == 5 && k[2] == 1 && k[4] == 3, "repeat list");
    CHECK(parse_int_list_expr("[1]*", k, ML_MAX_LAYERS, &err) < 0, "missing count rejected");
    CHECK(parse_int_list_expr("2*[1]", k, ML_MAX_LAYERS, &err) < 0, "bad order rejected");

    config_preset(&c, "tiny", NULL);
    config_set(&c, "model.layer_top_k=[2]+[1]", &err);
    config_set(&c, "model.dense_layers=1", &err);
    config_set(&c, "model.dense_ffn=32", &err);
    CHECK(config_layer_k(&c, k, &err) == 0 && k[0] == 0 && k[1] == 1, "dense layer gets k=0");

    /* config.yaml round trip */
    config_preset(&c, "small-cpu", NULL);
    config_set(&c, "model.layer_top_k=[2]*2+[1]*2", &err);
    config_set(&c, "train.lr=0.00123", &err);
    config_set(&c, "seed=77", &err);
    char path[] = "/tmp/moelab_cfg_XXXXXX";
    int fd = mkstemp(path);
    FILE *f = fdopen(fd, "w");
    config_write(&c, f);
    fclose(f);
    ml_config back;
    config_preset(&back, "tiny", NULL);
    CHECK(config_read_file(&back, path, &err) == 0, "read config.yaml: %s", err.msg);
    CHECK(!memcmp(&back, &c, sizeof c), "config.yaml round trip is exact");
    f = fopen(path, "a");
    fprintf(f, "model.experts: lots\n");
    fclose(f);
    int lines = 0;
    f = fopen(path, "r");
    for (int ch; (ch = fgetc(f)) != EOF;) lines += ch == '\n';
    fclose(f);
    char want[64];
    snprintf(want, sizeof want, ":%d: model.experts", lines);
    CHECK(config_read_file(&back, path, &err) == ML_EINPUT && strstr(err.msg, want), "file:line: key error, got '%s'",
          err.msg);
    remove(path);

    printf("config: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
