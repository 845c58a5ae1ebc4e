/* topk_schedule.c: progressive sparsification (Sigma-MoE-Tiny, arXiv 2512.16248): per-layer k lists in
 * stages, each until a number of training tokens, e.g. more experts in the lower layers first, then top-1
 * everywhere:
 *   balance.topk_stages=[{layers: "[2]*8+[1]*48", until_tokens: 20e9}, {layers: "[1]*56"}]
 * A step that starts with tokens_seen >= a stage's until_tokens uses the next stage. The stage is a
 * function of the tokens seen (saved in checkpoints), so resume needs no other state. */
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "policy.h"

#define MAX_STAGES 16

typedef struct {
    int k[ML_MAX_LAYERS];
    double until_tokens; /* INFINITY for the last stage */
} stage;

static const char *skip_ws(const char *s) {
    while (isspace((unsigned char)*s)) s++;
    return s;
}

/* Reads a value: a quoted string, or everything up to ',' or '}' outside brackets. */
static const char *read_value(const char *s, char *out, size_t cap) {
    size_t n = 0;
    if (*s == '"' || *s == '\'') {
        char q = *s++;
        while (*s && *s != q) {
            if (n + 1 < cap) out[n++] = *s;
            s++;
        }
        if (*s == q) s++;
    } else {
        int depth = 0;
        while (*s && (depth > 0 || (*s != ',' && *s != '}'))) {
            depth += *s == '[';
            depth -= *s == ']';
            if (n + 1 < cap) out[n++] = *s;
            s++;
        }
        while (n && isspace((unsigned char)out[n - 1])) n--;
    }
    out[n] = 0;
    return s;
}

#define FAIL(...) return ml_errf(err, ML_EINPUT, "balance.topk_stages: " __VA_ARGS__)

static int parse_stages(const ml_config *cfg, stage *st, ml_err *err) {
    const int L = cfg->model.layers;
    const char *s = skip_ws(cfg->balance.topk_stages);
    if (!*s) FAIL("empty: topk_schedule needs stages, e.g. [{layers: \"[2]*2+[1]*2\", until_tokens: 1e6}, {layers: \"[1]*4\"}]");
    if (*s++ != '[') FAIL("expected '[' to start the list of stages");
    int n = 0;
    for (;;) {
        s = skip_ws(s);
        if (*s != '{') FAIL("expected '{' to start stage %d", n + 1);
        if (n == MAX_STAGES) FAIL("more than %d stages", MAX_STAGES);
        stage *g = &st[n];
        int have_layers = 0;
        g->until_tokens = INFINITY;
        s++;
        for (;;) {
            s = skip_ws(s);
            char key[32], val[512];
            size_t kn = 0;
            while (*s && (isalnum((unsigned char)*s) || *s == '_') && kn + 1 < sizeof key) key[kn++] = *s++;
            key[kn] = 0;
            s = skip_ws(s);
            if (!kn || *s != ':') FAIL("stage %d: expected 'key: value'", n + 1);
            s = read_value(skip_ws(s + 1), val, sizeof val);
            if (!strcmp(key, "layers")) {
                int got = parse_int_list_expr(val, g->k, ML_MAX_LAYERS, err);
                if (got < 0) return ml_err_prefix(err, "balance.topk_stages: stage %d: layers", n + 1);
                if (got != L) FAIL("stage %d: layers '%s' gives %d entries but model.layers is %d", n + 1, val, got, L);
                for (int l = cfg->model.dense_layers; l < L; l++)
                    if (g->k[l] < 1 || g->k[l] > cfg->model.experts)
                        FAIL("stage %d: k=%d in layer %d is outside [1, model.experts=%d]", n + 1, g->k[l], l,
                             cfg->model.experts);
                have_layers = 1;
            } else if (!strcmp(key, "until_tokens")) {
                char *end;
                g->until_tokens = strtod(val, &end);
                if (end == val || *end || !(g->until_tokens > 0))
                    FAIL("stage %d: until_tokens '%s' is not a positive number", n + 1, val);
            } else {
                FAIL("stage %d: unknown key '%s' (layers, until_tokens)", n + 1, key);
            }
            s = skip_ws(s);
            if (*s == ',') { s++; continue; }
            if (*s == '}') { s++; break; }
            FAIL("stage %d: expected ',' or '}'", n + 1);
        }
        if (!have_layers) FAIL("stage %d has no layers", n + 1);
        if (n > 0 && !(g->until_tokens > st[n - 1].until_tokens))
            FAIL("stage %d: until_tokens must grow from stage to stage", n + 1);
        n++;
        s = skip_ws(s);
        if (*s == ',') { s++; continue; }
        if (*s == ']') { s++; break; }
        FAIL("expected ',' or ']' after stage %d", n);
    }
    if (*skip_ws(s)) FAIL("unexpected text after the closing ']'");
    if (isfinite(st[n - 1].until_tokens))
        FAIL("the last stage must not have until_tokens (it lasts to the end of training)");
    return n;
}

static int validate(const ml_config *cfg, ml_err *err) {
    stage st[MAX_STAGES];
    int n = parse_stages(cfg, st, err);
    return n < 0 ? n : ML_OK;
}

static int max_k(const ml_config *cfg) {
    stage st[MAX_STAGES];
    int n = parse_stages(cfg, st, NULL), kmax = 0;
    for (int i = 0; i < n; i++)
        for (int l = cfg->model.dense_layers; l < cfg->model.layers; l++) kmax = st[i].k[l] > kmax ? st[i].k[l] : kmax;
    return kmax;
}

static void choose_k(const ml_config *cfg, uint64_t tokens_seen, int *layer_k) {
    stage st[MAX_STAGES];
    int n = parse_stages(cfg, st, NULL), i = 0;
    if (n <= 0) return;
    while (i < n - 1 && (double)tokens_seen >= st[i].until_tokens) i++;
    for (int l = cfg->model.dense_layers; l < cfg->model.layers; l++) layer_k[l] = st[i].k[l];
}

const ml_policy policy_topk_schedule = {
    .name = "topk_schedule",
    .summary = "per-layer k in stages switched at token counts (Sigma-MoE-Tiny progressive sparsification)",
    .keys = (const char *const[]){"balance.topk_stages", NULL},
    .validate = validate,
    .max_k = max_k,
    .choose_k = choose_k,
};
