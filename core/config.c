/* config.c: presets, key=value overrides and validation of ml_config. One table lists every key with its
 * type, field and meaning; parsing, printing, help and (later) the params table all walk it. */
#include "config.h"

#include "balance/policy.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum key_type { K_INT, K_FLOAT, K_BOOL, K_STR, K_U64, K_ENUM };

typedef struct {
    const char *key;
    enum key_type type;
    size_t offset;
    size_t size;               /* for K_STR */
    const char *const *names;  /* for K_ENUM, NULL-terminated */
    const char *help;
} key_spec;

static const char *const score_names[] = {"softmax", "sigmoid", NULL};
static const char *const order_names[] = {"before", "after", NULL};
static const char *const bias_rule_names[] = {"sign", "proportional", NULL};
static const char *const drop_policy_names[] = {"probs", "position", NULL};
static const char *const forced_names[] = {"round_robin", "random", NULL};

#define F(field) offsetof(ml_config, field)
#define S(field) offsetof(ml_config, field), sizeof(((ml_config *)0)->field)
static const key_spec keys[] = {
    {"preset", K_STR, S(preset), NULL, "named starting point (tiny, small-cpu, gpu-small, sigma-tiny-full)"},
    {"seed", K_U64, F(seed), 0, NULL, "seed for initialisation and data order"},
    {"model.vocab", K_INT, F(model.vocab), 0, NULL, "vocabulary size (must match the token shards)"},
    {"model.dim", K_INT, F(model.dim), 0, NULL, "model width d"},
    {"model.layers", K_INT, F(model.layers), 0, NULL, "transformer blocks"},
    {"model.heads", K_INT, F(model.heads), 0, NULL, "query heads"},
    {"model.kv_heads", K_INT, F(model.kv_heads), 0, NULL, "key/value heads (grouped-query attention)"},
    {"model.seq_len", K_INT, F(model.seq_len), 0, NULL, "context length T"},
    {"model.experts", K_INT, F(model.experts), 0, NULL, "routed experts per MoE layer E"},
    {"model.expert_ffn", K_INT, F(model.expert_ffn), 0, NULL, "hidden width of each SwiGLU expert"},
    {"model.top_k", K_INT, F(model.top_k), 0, NULL, "experts per token k (all MoE layers)"},
    {"model.layer_top_k", K_STR, S(model.layer_top_k), NULL, "per-layer k, e.g. [2]*8+[1]*48 (overrides top_k)"},
    {"model.shared_experts", K_INT, F(model.shared_experts), 0, NULL, "always-active shared experts"},
    {"model.shared_ffn", K_INT, F(model.shared_ffn), 0, NULL, "hidden width of each shared expert"},
    {"model.dense_layers", K_INT, F(model.dense_layers), 0, NULL, "first layers with a dense FFN instead of MoE"},
    {"model.dense_ffn", K_INT, F(model.dense_ffn), 0, NULL, "hidden width of the dense FFN"},
    {"model.score", K_ENUM, F(model.score), 0, score_names, "router score function: softmax | sigmoid"},
    {"model.softmax_order", K_ENUM, F(model.softmax_order), 0, order_names,
     "softmax over all experts before top-k, or over the selected logits after"},
    {"model.norm_topk", K_BOOL, F(model.norm_topk), 0, NULL, "renormalise selected gates to sum to 1"},
    {"model.route_scale", K_FLOAT, F(model.route_scale), 0, NULL, "multiplier on the gate values"},
    {"model.qk_norm", K_BOOL, F(model.qk_norm), 0, NULL, "RMSNorm on queries and keys per head"},
    {"model.tie_embeddings", K_BOOL, F(model.tie_embeddings), 0, NULL, "LM head shares the embedding matrix"},
    {"model.rope_theta", K_FLOAT, F(model.rope_theta), 0, NULL, "RoPE base"},
    {"model.norm_eps", K_FLOAT, F(model.norm_eps), 0, NULL, "RMSNorm epsilon"},
    {"model.init_std", K_FLOAT, F(model.init_std), 0, NULL, "std of the normal weight initialisation"},
    {"balance.policy", K_STR, S(balance.policy), NULL,
     "balancing policies joined by '+' (moelab train --help-policies), e.g. aux_loss+z_loss"},
    {"balance.aux_coef", K_FLOAT, F(balance.aux_coef), 0, NULL,
     "aux_loss / seq_aux_loss / global_aux_loss coefficient: coef * E * sum_i f_i * P_i per MoE layer"},
    {"balance.z_coef", K_FLOAT, F(balance.z_coef), 0, NULL, "z_loss coefficient: coef * mean_t logsumexp(logits_t)^2"},
    {"balance.top1_coef", K_FLOAT, F(balance.top1_coef), 0, NULL, "top1_loss coefficient"},
    {"balance.top1_tau", K_FLOAT, F(balance.top1_tau), 0, NULL, "top1_loss softmax temperature tau"},
    {"balance.bias_rate", K_FLOAT, F(balance.bias_rate), 0, NULL, "loss_free bias update rate u"},
    {"balance.bias_rule", K_ENUM, F(balance.bias_rule), 0, bias_rule_names,
     "loss_free update: sign (b += u sign(mean - load)) | proportional (b += u (mean - load) / mean)"},
    {"balance.topk_stages", K_STR, S(balance.topk_stages), NULL,
     "topk_schedule stages: [{layers: \"[2]*2+[1]*6\", until_tokens: 20e6}, {layers: \"[1]*8\"}]"},
    {"balance.capacity_factor", K_FLOAT, F(balance.capacity_factor), 0, NULL,
     "capacity: an expert takes at most ceil(factor * tokens * k / E) per micro-batch (0 = dropless)"},
    {"balance.drop_policy", K_ENUM, F(balance.drop_policy), 0, drop_policy_names,
     "capacity: which assignments an over-full expert keeps: probs (highest scores) | position (earliest)"},
    {"balance.forced", K_ENUM, F(balance.forced), 0, forced_names,
     "forced_balance assignment: round_robin | random"},
    {"train.batch", K_INT, F(train.batch), 0, NULL, "sequences per micro-batch B"},
    {"train.steps", K_INT, F(train.steps), 0, NULL, "optimizer steps"},
    {"train.accum", K_INT, F(train.accum), 0, NULL, "micro-batches per optimizer step (gradient accumulation)"},
    {"train.warmup", K_INT, F(train.warmup), 0, NULL, "linear warmup steps"},
    {"train.lr", K_FLOAT, F(train.lr), 0, NULL, "peak learning rate"},
    {"train.min_lr_ratio", K_FLOAT, F(train.min_lr_ratio), 0, NULL, "cosine decays to lr * this"},
    {"train.weight_decay", K_FLOAT, F(train.weight_decay), 0, NULL, "AdamW decoupled weight decay (not on norms)"},
    {"train.beta1", K_FLOAT, F(train.beta1), 0, NULL, "AdamW beta1"},
    {"train.beta2", K_FLOAT, F(train.beta2), 0, NULL, "AdamW beta2"},
    {"train.eps", K_FLOAT, F(train.eps), 0, NULL, "AdamW epsilon"},
    {"train.grad_clip", K_FLOAT, F(train.grad_clip), 0, NULL, "global gradient-norm clip (0 = off)"},
    {"train.eval_every", K_INT, F(train.eval_every), 0, NULL, "validation every N steps (0 = only at the end)"},
    {"train.eval_batches", K_INT, F(train.eval_batches), 0, NULL, "validation micro-batches per evaluation"},
    {"train.ckpt_every", K_INT, F(train.ckpt_every), 0, NULL, "checkpoint every N steps (0 = only at the end)"},
    {"train.log_every", K_INT, F(train.log_every), 0, NULL, "progress line every N steps"},
    {"data.dir", K_STR, S(data.dir), NULL, "folder with train.bin and val.bin (llm.c shards)"},
    {"run.dir", K_STR, S(run.dir), NULL, "run folder (resolved config, checkpoints, log); \"\" = runs/<preset>-<seed>"},
    {"run.resume", K_STR, S(run.resume), NULL, "checkpoint to resume from"},
    {"run.id", K_STR, S(run.id), NULL, "run id in the run database (\"\" = the run folder's name)"},
    {"run.name", K_STR, S(run.name), NULL, "display name (\"\" = the id)"},
    {"run.experiment", K_STR, S(run.experiment), NULL, "experiment the run belongs to"},
    {"run.db", K_STR, S(run.db), NULL, "run database (SQLite); \"\" = none"},
    {"trace.every", K_INT, F(trace.every), 0, NULL, "record routing statistics to run.dir/trace.h5 every N steps (0 = off)"},
    {"trace.flush_every", K_INT, F(trace.flush_every), 0, NULL,
     "write buffered trace rows every N steps (and at every checkpoint)"},
};
#undef F
#undef S
#define NKEYS (sizeof keys / sizeof keys[0])

const char *const config_preset_names[] = {"tiny", "small-cpu", "gpu-small", "sigma-tiny-full", NULL};

static void defaults(ml_config *c) {
    memset(c, 0, sizeof *c);
    c->seed = 1337;
    c->model.vocab = 8192;
    c->model.top_k = 1;
    c->model.score = SCORE_SOFTMAX;
    c->model.softmax_order = SOFTMAX_BEFORE_TOPK;
    c->model.norm_topk = 0;
    c->model.route_scale = 1.0f;
    c->model.qk_norm = 1;
    c->model.tie_embeddings = 1;
    c->model.rope_theta = 10000.0f;
    c->model.norm_eps = 1e-6f;
    c->model.init_std = 0.02f;
    snprintf(c->balance.policy, sizeof c->balance.policy, "aux_loss");
    c->balance.aux_coef = 1e-2f;
    c->balance.z_coef = 1e-3f;
    c->balance.top1_coef = 1e-2f, c->balance.top1_tau = 0.1f;
    c->balance.bias_rate = 1e-3f;
    c->balance.capacity_factor = 0;
    c->train.accum = 1;
    c->train.lr = 3e-3f;
    c->train.min_lr_ratio = 0.1f;
    c->train.weight_decay = 0.1f;
    c->train.beta1 = 0.9f;
    c->train.beta2 = 0.95f;
    c->train.eps = 1e-8f;
    c->train.grad_clip = 1.0f;
    c->train.eval_batches = 8;
    c->train.log_every = 10;
    snprintf(c->data.dir, sizeof c->data.dir, "data/tokens/vocab8192");
    snprintf(c->run.experiment, sizeof c->run.experiment, "default");
    snprintf(c->run.db, sizeof c->run.db, "runs.db");
    c->trace.every = 1;
    c->trace.flush_every = 64; /* the trace's chunk depth: flushes write whole chunks (trace.c) */
}

int config_preset(ml_config *c, const char *name, ml_err *err) {
    defaults(c);
    if (!strcmp(name, "tiny")) {
        /* tests and smoke runs: seconds on one core */
        c->model.dim = 64, c->model.layers = 2, c->model.heads = 4, c->model.kv_heads = 2, c->model.seq_len = 64;
        c->model.experts = 8, c->model.expert_ffn = 64, c->model.top_k = 2;
        c->train.batch = 16, c->train.steps = 600, c->train.warmup = 20, c->train.lr = 3e-3f;
        c->train.eval_every = 100, c->train.eval_batches = 8;
    } else if (!strcmp(name, "small-cpu")) {
        /* the paper's routing regime (96 fine-grained experts, top-1) at a width 2 cores train in minutes */
        c->model.dim = 128, c->model.layers = 4, c->model.heads = 4, c->model.kv_heads = 2, c->model.seq_len = 128;
        c->model.experts = 96, c->model.expert_ffn = 64, c->model.top_k = 1;
        c->train.batch = 16, c->train.steps = 1000, c->train.warmup = 50, c->train.lr = 2e-3f;
        c->train.eval_every = 100, c->train.eval_batches = 8;
    } else if (!strcmp(name, "gpu-small")) {
        /* one GPU: the Sigma-MoE-Tiny width at 8 layers */
        c->model.vocab = 50257, c->model.dim = 1536, c->model.layers = 8, c->model.heads = 16, c->model.kv_heads = 4;
        c->model.seq_len = 2048, c->model.experts = 96, c->model.expert_ffn = 768, c->model.top_k = 1;
        c->model.init_std = 0.006f;
        c->train.batch = 8, c->train.steps = 5000, c->train.warmup = 200, c->train.lr = 1e-3f;
        c->train.eval_every = 250, c->train.eval_batches = 16;
        snprintf(c->data.dir, sizeof c->data.dir, "data/tokens/vocab50257");
    } else if (!strcmp(name, "sigma-tiny-full")) {
        /* Sigma-MoE-Tiny (arXiv 2512.16248): 56 layers, d 1536, GQA 16/4, 96 experts of ffn 768, top-1 */
        c->model.vocab = 50257, c->model.dim = 1536, c->model.layers = 56, c->model.heads = 16, c->model.kv_heads = 4;
        c->model.seq_len = 4096, c->model.experts = 96, c->model.expert_ffn = 768, c->model.top_k = 1;
        c->model.init_std = 0.006f, c->model.tie_embeddings = 0;
        c->train.batch = 4, c->train.steps = 100000, c->train.warmup = 2000, c->train.lr = 6e-4f;
        c->train.eval_every = 1000, c->train.eval_batches = 32;
        snprintf(c->data.dir, sizeof c->data.dir, "data/tokens/vocab50257");
    } else {
        char list[256] = "";
        for (int i = 0; config_preset_names[i]; i++) {
            strcat(list, i ? ", " : "");
            strcat(list, config_preset_names[i]);
        }
        return ml_errf(err, ML_EINPUT, "preset: unknown preset '%s' (known: %s)", name, list);
    }
    snprintf(c->preset, sizeof c->preset, "%s", name);
    return ML_OK;
}

static const key_spec *find_key(const char *key) {
    for (size_t i = 0; i < NKEYS; i++)
        if (!strcmp(keys[i].key, key)) return &keys[i];
    return NULL;
}

int config_key_type(const char *key) {
    const key_spec *k = find_key(key);
    return !k ? ML_KEY_UNKNOWN : k->type == K_STR ? ML_KEY_TEXT : ML_KEY_VALUE;
}

static int parse_value(ml_config *c, const key_spec *k, const char *v, ml_err *err) {
    char *end = NULL;
    void *p = (char *)c + k->offset;
    errno = 0;
    switch (k->type) {
    case K_INT: {
        double d = strtod(v, &end); /* accept 1e6-style integers */
        if (end == v || *end || errno || d != floor(d) || fabs(d) > 2147483647.0)
            return ml_errf(err, ML_EINPUT, "%s: '%s' is not an integer", k->key, v);
        *(int *)p = (int)d;
        break;
    }
    case K_U64: {
        if (!isdigit((unsigned char)*v)) return ml_errf(err, ML_EINPUT, "%s: '%s' is not a non-negative integer", k->key, v);
        unsigned long long u = strtoull(v, &end, 10);
        if (end == v || *end || errno) return ml_errf(err, ML_EINPUT, "%s: '%s' is not an integer", k->key, v);
        *(uint64_t *)p = u;
        break;
    }
    case K_FLOAT: {
        double d = strtod(v, &end);
        if (end == v || *end || errno || !isfinite(d) || !isfinite((float)d))
            return ml_errf(err, ML_EINPUT, "%s: '%s' is not a finite number (in float range)", k->key, v);
        *(float *)p = (float)d;
        break;
    }
    case K_BOOL:
        if (!strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes") || !strcmp(v, "on")) *(int *)p = 1;
        else if (!strcmp(v, "false") || !strcmp(v, "0") || !strcmp(v, "no") || !strcmp(v, "off")) *(int *)p = 0;
        else return ml_errf(err, ML_EINPUT, "%s: '%s' is not a boolean (true/false)", k->key, v);
        break;
    case K_STR:
        if (strlen(v) >= k->size) return ml_errf(err, ML_EINPUT, "%s: value longer than %zu bytes", k->key, k->size - 1);
        for (const char *c = v; *c; c++) /* config.yaml holds one key per line */
            if (iscntrl((unsigned char)*c)) return ml_errf(err, ML_EINPUT, "%s: value holds a control character", k->key);
        snprintf((char *)p, k->size, "%s", v);
        break;
    case K_ENUM:
        for (int i = 0; k->names[i]; i++)
            if (!strcmp(v, k->names[i])) {
                *(int *)p = i;
                return ML_OK;
            }
        {
            char list[128] = "";
            for (int i = 0; k->names[i]; i++) {
                strcat(list, i ? " | " : "");
                strcat(list, k->names[i]);
            }
            return ml_errf(err, ML_EINPUT, "%s: '%s' is not one of %s", k->key, v, list);
        }
    }
    return ML_OK;
}

int config_set(ml_config *c, const char *assignment, ml_err *err) {
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return ml_errf(err, ML_EINPUT, "'%s': expected key=value (see moelab train --help-config)", assignment);
    char key[128];
    size_t n = (size_t)(eq - assignment);
    if (n >= sizeof key) return ml_errf(err, ML_EINPUT, "'%.40s...': key too long", assignment);
    memcpy(key, assignment, n);
    key[n] = 0;
    const char *v = eq + 1;
    if (!strcmp(key, "preset")) return config_preset(c, v, err);
    const key_spec *k = find_key(key);
    if (!k) return ml_errf(err, ML_EINPUT, "%s: unknown key (see moelab train --help-config)", key);
    return parse_value(c, k, v, err);
}

int parse_int_list_expr(const char *expr, int *out, int cap, ml_err *err) {
    /* grammar: term ('+' term)* ; term: '[' int (',' int)* ']' ('*' int)? */
    const char *s = expr;
    int n = 0;
    for (;;) {
        while (isspace((unsigned char)*s)) s++;
        if (*s != '[') return ml_errf(err, ML_EINPUT, "'%s': expected '[' at position %d", expr, (int)(s - expr));
        s++;
        int vals[ML_MAX_LAYERS], nv = 0;
        for (;;) {
            while (isspace((unsigned char)*s)) s++;
            char *end;
            long v = strtol(s, &end, 10);
            if (end == s) return ml_errf(err, ML_EINPUT, "'%s': expected an integer at position %d", expr, (int)(s - expr));
            if (nv >= ML_MAX_LAYERS) return ml_errf(err, ML_EINPUT, "'%s': list too long", expr);
            vals[nv++] = (int)v;
            s = end;
            while (isspace((unsigned char)*s)) s++;
            if (*s == ',') { s++; continue; }
            if (*s == ']') { s++; break; }
            return ml_errf(err, ML_EINPUT, "'%s': expected ',' or ']' at position %d", expr, (int)(s - expr));
        }
        while (isspace((unsigned char)*s)) s++;
        long rep = 1;
        if (*s == '*') {
            s++;
            char *end;
            rep = strtol(s, &end, 10);
            if (end == s || rep < 0)
                return ml_errf(err, ML_EINPUT, "'%s': expected a repeat count at position %d", expr, (int)(s - expr));
            s = end;
        }
        for (long r = 0; r < rep; r++)
            for (int i = 0; i < nv; i++) {
                if (n >= cap) return ml_errf(err, ML_EINPUT, "'%s': more than %d entries", expr, cap);
                out[n++] = vals[i];
            }
        while (isspace((unsigned char)*s)) s++;
        if (*s == '+') { s++; continue; }
        if (*s == 0) return n;
        return ml_errf(err, ML_EINPUT, "'%s': unexpected '%c' at position %d", expr, *s, (int)(s - expr));
    }
}

int config_layer_k(const ml_config *c, int *k, ml_err *err) {
    const int L = c->model.layers;
    if (c->model.layer_top_k[0]) {
        int tmp[ML_MAX_LAYERS];
        int n = parse_int_list_expr(c->model.layer_top_k, tmp, ML_MAX_LAYERS, err);
        if (n < 0) return ml_err_prefix(err, "model.layer_top_k");
        if (n != L)
            return ml_errf(err, ML_EINPUT, "model.layer_top_k: '%s' gives %d entries but model.layers is %d",
                           c->model.layer_top_k, n, L);
        for (int l = 0; l < L; l++) k[l] = tmp[l];
    } else {
        for (int l = 0; l < L; l++) k[l] = c->model.top_k;
    }
    for (int l = 0; l < L; l++) {
        if (l < c->model.dense_layers) { k[l] = 0; continue; }
        if (k[l] < 1 || k[l] > c->model.experts)
            return ml_errf(err, ML_EINPUT, "%s: k=%d in layer %d is outside [1, model.experts=%d]",
                           c->model.layer_top_k[0] ? "model.layer_top_k" : "model.top_k", k[l], l, c->model.experts);
    }
    return ML_OK;
}

#define REQUIRE(cond, ...) do { if (!(cond)) return ml_errf(err, ML_EINPUT, __VA_ARGS__); } while (0)

int config_validate(const ml_config *c, ml_err *err) {
    const typeof(c->model) *m = &c->model;
    REQUIRE(m->vocab >= 2, "model.vocab: %d must be at least 2", m->vocab);
    REQUIRE(m->dim >= 1, "model.dim: %d must be positive", m->dim);
    REQUIRE(m->layers >= 1 && m->layers <= ML_MAX_LAYERS, "model.layers: %d must be in [1, %d]", m->layers, ML_MAX_LAYERS);
    REQUIRE(m->heads >= 1, "model.heads: %d must be positive", m->heads);
    REQUIRE(m->dim % m->heads == 0, "model.heads: model.dim=%d is not divisible by model.heads=%d", m->dim, m->heads);
    REQUIRE((m->dim / m->heads) % 2 == 0, "model.heads: head size %d must be even for RoPE", m->dim / m->heads);
    REQUIRE(m->kv_heads >= 1 && m->heads % m->kv_heads == 0,
            "model.kv_heads: %d must divide model.heads=%d", m->kv_heads, m->heads);
    REQUIRE(m->seq_len >= 1, "model.seq_len: %d must be positive", m->seq_len);
    REQUIRE(m->dense_layers >= 0 && m->dense_layers <= m->layers,
            "model.dense_layers: %d must be in [0, model.layers=%d]", m->dense_layers, m->layers);
    REQUIRE(m->dense_layers == 0 || m->dense_ffn >= 1, "model.dense_ffn: must be positive when model.dense_layers > 0");
    if (m->dense_layers < m->layers) {
        REQUIRE(m->experts >= 1, "model.experts: %d must be positive", m->experts);
        REQUIRE(m->expert_ffn >= 1, "model.expert_ffn: %d must be positive", m->expert_ffn);
        REQUIRE(m->top_k >= 1 && m->top_k <= m->experts, "model.top_k: k=%d must be in [1, model.experts=%d]",
                m->top_k, m->experts);
    }
    REQUIRE(m->shared_experts >= 0, "model.shared_experts: %d must not be negative", m->shared_experts);
    REQUIRE(m->shared_experts == 0 || m->shared_ffn >= 1,
            "model.shared_ffn: must be positive when model.shared_experts > 0");
    REQUIRE(m->softmax_order == SOFTMAX_BEFORE_TOPK || m->score == SCORE_SOFTMAX,
            "model.softmax_order: 'after' needs model.score=softmax");
    REQUIRE(m->route_scale > 0, "model.route_scale: %g must be positive", m->route_scale);
    REQUIRE(m->norm_eps > 0, "model.norm_eps: %g must be positive", m->norm_eps);
    REQUIRE(m->rope_theta > 0, "model.rope_theta: %g must be positive", m->rope_theta);
    REQUIRE(m->init_std > 0, "model.init_std: %g must be positive", m->init_std);
    int k[ML_MAX_LAYERS];
    int rc = config_layer_k(c, k, err);
    if (rc) return rc;
    /* the balance.* keys are checked by the policies that read them (core/balance/) */
    if ((rc = balance_validate(c, err))) return rc;
    const typeof(c->train) *t = &c->train;
    REQUIRE(t->batch >= 1, "train.batch: %d must be positive", t->batch);
    REQUIRE(t->steps >= 0, "train.steps: %d must not be negative", t->steps);
    REQUIRE(t->accum >= 1, "train.accum: %d must be positive", t->accum);
    REQUIRE(t->warmup >= 0, "train.warmup: %d must not be negative", t->warmup);
    REQUIRE(t->lr > 0, "train.lr: %g must be positive", t->lr);
    REQUIRE(t->min_lr_ratio >= 0 && t->min_lr_ratio <= 1, "train.min_lr_ratio: %g must be in [0, 1]", t->min_lr_ratio);
    REQUIRE(t->weight_decay >= 0, "train.weight_decay: %g must not be negative", t->weight_decay);
    REQUIRE(t->beta1 >= 0 && t->beta1 < 1, "train.beta1: %g must be in [0, 1)", t->beta1);
    REQUIRE(t->beta2 >= 0 && t->beta2 < 1, "train.beta2: %g must be in [0, 1)", t->beta2);
    REQUIRE(t->eps > 0, "train.eps: %g must be positive", t->eps);
    REQUIRE(t->grad_clip >= 0, "train.grad_clip: %g must not be negative", t->grad_clip);
    REQUIRE(t->eval_every >= 0, "train.eval_every: %d must not be negative", t->eval_every);
    REQUIRE(t->eval_batches >= 1, "train.eval_batches: %d must be positive", t->eval_batches);
    REQUIRE(t->ckpt_every >= 0, "train.ckpt_every: %d must not be negative", t->ckpt_every);
    REQUIRE(t->log_every >= 1, "train.log_every: %d must be positive", t->log_every);
    REQUIRE(c->trace.every >= 0, "trace.every: %d must not be negative", c->trace.every);
    REQUIRE(c->trace.flush_every >= 1, "trace.flush_every: %d must be positive", c->trace.flush_every);
    for (const char *p = c->run.id; *p; p++)
        REQUIRE(*p != '/' && *p != ' ' && *p != '\'' && *p != '"', "run.id: '%s' may not contain '/', quotes or spaces",
                c->run.id);
    return ML_OK;
}

int config_read_file(ml_config *c, const char *path, ml_err *err) {
    FILE *f = fopen(path, "r");
    if (!f) return ml_errf(err, ML_EINPUT, "%s: %s", path, strerror(errno));
    char line[2048];
    int lineno = 0, rc = ML_OK;
    /* the preset line comes first in config_write's order, so applying lines in order is correct */
    while (rc == ML_OK && fgets(line, sizeof line, f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash && !strchr(line, '"')) *hash = 0;
        char *s = line;
        while (isspace((unsigned char)*s)) s++;
        size_t n = strlen(s);
        while (n && isspace((unsigned char)s[n - 1])) s[--n] = 0;
        if (!*s) continue;
        char *colon = strchr(s, ':');
        if (!colon) {
            rc = ml_errf(err, ML_EINPUT, "%s:%d: expected 'key: value'", path, lineno);
            break;
        }
        *colon = 0;
        char *v = colon + 1;
        while (isspace((unsigned char)*v)) v++;
        n = strlen(v);
        if (n >= 2 && v[0] == '"' && v[n - 1] == '"') v[n - 1] = 0, v++;
        char assignment[2200];
        snprintf(assignment, sizeof assignment, "%s=%s", s, v);
        if (!strcmp(s, "preset")) {
            /* a preset line resets the defaults; the following lines then restore every key */
            rc = config_preset(c, v, err);
        } else {
            rc = config_set(c, assignment, err);
        }
        if (rc) ml_err_prefix(err, "%s:%d", path, lineno);
    }
    fclose(f);
    return rc;
}

static void print_value(const ml_config *c, const key_spec *k, FILE *f) {
    const void *p = (const char *)c + k->offset;
    switch (k->type) {
    case K_INT: fprintf(f, "%d", *(const int *)p); break;
    case K_U64: fprintf(f, "%" PRIu64, *(const uint64_t *)p); break;
    case K_FLOAT: { /* the shortest decimal that reads back as the same float: 0.01, not 0.00999999978 */
        const float v = *(const float *)p;
        char buf[32];
        for (int prec = 1; prec <= 9; prec++) {
            snprintf(buf, sizeof buf, "%.*g", prec, v);
            if (strtof(buf, NULL) == v) break;
        }
        fputs(buf, f);
        break;
    }
    case K_BOOL: fputs(*(const int *)p ? "true" : "false", f); break;
    case K_STR: fprintf(f, "\"%s\"", (const char *)p); break;
    case K_ENUM: fputs(k->names[*(const int *)p], f); break;
    }
}

void config_foreach(const ml_config *c, void (*fn)(const char *key, const char *value, void *ctx), void *ctx) {
    for (size_t i = 0; i < NKEYS; i++) {
        char buf[1100];
        FILE *f = fmemopen(buf, sizeof buf, "w");
        if (keys[i].type == K_STR) fputs((const char *)c + keys[i].offset, f);
        else print_value(c, &keys[i], f);
        fputc(0, f);
        fclose(f);
        buf[sizeof buf - 1] = 0;
        fn(keys[i].key, buf, ctx);
    }
}

void config_write(const ml_config *c, FILE *f) {
    for (size_t i = 0; i < NKEYS; i++) {
        fprintf(f, "%s: ", keys[i].key);
        print_value(c, &keys[i], f);
        fputc('\n', f);
    }
}

void config_print_help(FILE *f) {
    ml_config d;
    config_preset(&d, "tiny", NULL);
    fprintf(f, "Config keys (defaults shown for preset=tiny):\n");
    for (size_t i = 0; i < NKEYS; i++) {
        fprintf(f, "  %-22s ", keys[i].key);
        print_value(&d, &keys[i], f);
        fprintf(f, "\n      %s\n", keys[i].help);
    }
}
