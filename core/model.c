/* model.c: forward and backward of the MoE transformer through the backend op table. Reads top to bottom
 * like the diagram in model.h: embed, then per block attention and the MoE FFN, then head and loss.
 * Parameter layout and init live here too; training policy (LR, clipping, data) is train.c's. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops_cpu.h" /* rope_table: host-side constant tables */
#include "rng.h"

/* ---------------------------------------------------------------- parameter table */

static float *add_tensor(ml_model *m, const char *name, int ndim, int d0, int d1, int d2, int decay) {
    ml_tensor *t = &m->tensors[m->ntensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->shape[0] = d0, t->shape[1] = d1, t->shape[2] = d2;
    t->numel = (size_t)d0 * (ndim > 1 ? d1 : 1) * (ndim > 2 ? d2 : 1);
    t->offset = m->nparams;
    t->decay = decay;
    m->nparams += t->numel;
    return (float *)(uintptr_t)(t->offset + 1); /* placeholder: an offset, turned into pointers by bind() */
}

/* Builds the table (shapes, offsets); views hold offset+1 until bind() makes them pointers into an arena. */
static void build_table(ml_model *m, ml_tensors *v) {
    char nm[48];
    m->ntensors = 0, m->nparams = 0;
    memset(v, 0, sizeof *v);
    v->wte = add_tensor(m, "wte", 2, m->V, m->C, 0, 1);
    for (int l = 0; l < m->L; l++) {
        ml_block_tensors *b = &v->block[l];
#define T_(field, suffix, ...) snprintf(nm, sizeof nm, "layers.%d.%s", l, suffix), b->field = add_tensor(m, nm, __VA_ARGS__)
        T_(attn_norm, "attn_norm", 1, m->C, 0, 0, 0);
        T_(wq, "wq", 2, m->H * m->hd, m->C, 0, 1);
        T_(wk, "wk", 2, m->KV * m->hd, m->C, 0, 1);
        T_(wv, "wv", 2, m->KV * m->hd, m->C, 0, 1);
        T_(wo, "wo", 2, m->C, m->H * m->hd, 0, 1);
        if (m->cfg.model.qk_norm) {
            T_(q_norm, "q_norm", 1, m->hd, 0, 0, 0);
            T_(k_norm, "k_norm", 1, m->hd, 0, 0, 0);
        }
        T_(ffn_norm, "ffn_norm", 1, m->C, 0, 0, 0);
        if (m->layer_k[l] == 0) {
            T_(dense_w13, "dense_w13", 2, 2 * m->Fd, m->C, 0, 1);
            T_(dense_w2, "dense_w2", 2, m->C, m->Fd, 0, 1);
        } else {
            T_(router, "router", 2, m->E, m->C, 0, 1);
            T_(expert_w13, "experts.w13", 3, m->E, 2 * m->F, m->C, 1);
            T_(expert_w2, "experts.w2", 3, m->E, m->C, m->F, 1);
            if (m->Fs) {
                T_(shared_w13, "shared.w13", 2, 2 * m->Fs, m->C, 0, 1);
                T_(shared_w2, "shared.w2", 2, m->C, m->Fs, 0, 1);
            }
        }
#undef T_
    }
    v->final_norm = add_tensor(m, "final_norm", 1, m->C, 0, 0, 0);
    v->lm_head = m->cfg.model.tie_embeddings ? v->wte : add_tensor(m, "lm_head", 2, m->V, m->C, 0, 1);
}

static float *rebase(float *placeholder, float *arena) {
    return placeholder ? arena + ((uintptr_t)placeholder - 1) : NULL;
}

static void bind(const ml_tensors *table, ml_tensors *out, float *arena) {
    out->wte = rebase(table->wte, arena);
    out->final_norm = rebase(table->final_norm, arena);
    out->lm_head = rebase(table->lm_head, arena);
    for (int l = 0; l < ML_MAX_LAYERS; l++) {
        float **src = (float **)&table->block[l], **dst = (float **)&out->block[l];
        for (size_t i = 0; i < sizeof(ml_block_tensors) / sizeof(float *); i++) dst[i] = rebase(src[i], arena);
    }
}

const ml_tensor *model_tensor(const ml_model *m, const char *name) {
    for (int i = 0; i < m->ntensors; i++)
        if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
    return NULL;
}

/* ---------------------------------------------------------------- allocation */

typedef struct {
    const ml_backend *be;
    int failed;
} allocator;

static void *take(allocator *a, size_t bytes) {
    void *p = a->be->alloc(bytes);
    if (!p) a->failed = 1;
    return p;
}
#define ALLOC_F(a, n) ((float *)take(a, sizeof(float) * (size_t)(n)))
#define ALLOC_I(a, n) ((int32_t *)take(a, sizeof(int32_t) * (size_t)(n)))

static void set_dims(ml_model *m, const ml_config *cfg, int B) {
    m->cfg = *cfg;
    m->B = B, m->T = cfg->model.seq_len, m->C = cfg->model.dim, m->L = cfg->model.layers;
    m->H = cfg->model.heads, m->KV = cfg->model.kv_heads, m->hd = m->C / m->H, m->V = cfg->model.vocab;
    m->E = cfg->model.experts, m->F = cfg->model.expert_ffn, m->Fd = cfg->model.dense_ffn;
    m->Fs = cfg->model.shared_experts * cfg->model.shared_ffn;
}

int model_init(ml_model *m, const ml_config *cfg, const ml_backend *be, int B, int kmax, ml_err *err) {
    memset(m, 0, sizeof *m);
    int rc = config_validate(cfg, err);
    if (rc) return rc;
    set_dims(m, cfg, B);
    m->be = be;
    if ((rc = balance_init(&m->balance, cfg, err))) return rc;
    /* MOELAB_HOST_POLICIES=1: every loss and cap on host copies of the scores, logits and choices, not in its
     * device form (the reference the tests compare the device forms with, in whole training steps) */
    const char *host_policies = getenv("MOELAB_HOST_POLICIES");
    if (host_policies && !strcmp(host_policies, "1"))
        m->balance.has_host_loss = m->balance.has_loss, m->balance.has_host_cap = m->balance.has_cap;
    balance_choose_k(&m->balance, cfg, 0, m->layer_k);
    m->kmax = kmax > balance_max_k(cfg) ? kmax : balance_max_k(cfg);

    ml_tensors table;
    build_table(m, &table);
    allocator a = {be, 0};
    m->params = ALLOC_F(&a, m->nparams);
    m->grads = ALLOC_F(&a, m->nparams);
    m->adam_m = ALLOC_F(&a, m->nparams);
    m->adam_v = ALLOC_F(&a, m->nparams);
    if (a.failed) {
        model_free(m);
        return ml_errf(err, ML_ERUN, "out of memory allocating %zu parameters (x4 for gradients and AdamW)",
                       m->nparams);
    }
    bind(&table, &m->p, m->params);
    bind(&table, &m->g, m->grads);

    const size_t M = (size_t)B * m->T, C = m->C, Hd = (size_t)m->H * m->hd, KVd = (size_t)m->KV * m->hd;
    const size_t E = m->E, K = m->kmax, MK = M * (K ? K : 1);
    size_t widest = C;
    for (int l = 0; l < m->L; l++) {
        ml_block_acts *x = &m->acts[l];
        x->res_in = ALLOC_F(&a, M * C);
        x->ln1 = ALLOC_F(&a, M * C), x->rstd1 = ALLOC_F(&a, M);
        x->q_raw = ALLOC_F(&a, M * Hd), x->k_raw = ALLOC_F(&a, M * KVd), x->v = ALLOC_F(&a, M * KVd);
        if (cfg->model.qk_norm) {
            x->q_normed = ALLOC_F(&a, M * Hd), x->k_normed = ALLOC_F(&a, M * KVd);
            x->q_rstd = ALLOC_F(&a, M * m->H), x->k_rstd = ALLOC_F(&a, M * m->KV);
        }
        x->q = ALLOC_F(&a, M * Hd), x->k = ALLOC_F(&a, M * KVd);
        x->att = ALLOC_F(&a, be->attention_state_floats(B, m->T, m->H));
        x->atty = ALLOC_F(&a, M * Hd);
        x->res_mid = ALLOC_F(&a, M * C);
        x->ln2 = ALLOC_F(&a, M * C), x->rstd2 = ALLOC_F(&a, M);
        if (m->layer_k[l] == 0) {
            x->h13 = ALLOC_F(&a, M * 2 * m->Fd), x->act = ALLOC_F(&a, M * m->Fd);
            widest = widest > (size_t)2 * m->Fd ? widest : (size_t)2 * m->Fd;
        } else {
            x->logits = ALLOC_F(&a, M * E), x->probs = ALLOC_F(&a, M * E), x->gate = ALLOC_F(&a, MK);
            x->idx = ALLOC_I(&a, MK), x->route = ALLOC_I(&a, MK);
            x->counts = ALLOC_I(&a, E), x->offsets = ALLOC_I(&a, E + 1);
            x->slot = ALLOC_I(&a, MK);
            x->xe = ALLOC_F(&a, MK * C), x->eh13 = ALLOC_F(&a, MK * 2 * m->F), x->eact = ALLOC_F(&a, MK * m->F);
            x->ye = ALLOC_F(&a, MK * C);
            if (m->Fs) {
                x->sh13 = ALLOC_F(&a, M * 2 * m->Fs), x->sact = ALLOC_F(&a, M * m->Fs);
                widest = widest > (size_t)2 * m->Fs ? widest : (size_t)2 * m->Fs;
            }
        }
    }
    widest = widest > Hd ? widest : Hd;
    m->res_final = ALLOC_F(&a, M * C), m->lnf = ALLOC_F(&a, M * C), m->rstdf = ALLOC_F(&a, M);
    m->logits = ALLOC_F(&a, M * m->V), m->losses = ALLOC_F(&a, M);
    m->rope_cos = ALLOC_F(&a, (size_t)m->T * m->hd / 2), m->rope_sin = ALLOC_F(&a, (size_t)m->T * m->hd / 2);
    m->tokens = ALLOC_I(&a, M), m->targets = ALLOC_I(&a, M);
    m->d_res = ALLOC_F(&a, M * C), m->d_ln = ALLOC_F(&a, M * C);
    m->d_a = ALLOC_F(&a, M * widest), m->d_b = ALLOC_F(&a, M * widest);
    m->d_q = ALLOC_F(&a, M * Hd), m->d_k = ALLOC_F(&a, M * KVd), m->d_v = ALLOC_F(&a, M * KVd);
    m->d_qn = ALLOC_F(&a, M * Hd), m->d_kn = ALLOC_F(&a, M * KVd);
    m->d_logits = ALLOC_F(&a, M * m->V);
    if (E && K) {
        m->d_xe = ALLOC_F(&a, MK * C), m->d_eh13 = ALLOC_F(&a, MK * 2 * m->F), m->d_eact = ALLOC_F(&a, MK * m->F);
        m->d_ye = ALLOC_F(&a, MK * C), m->d_gate = ALLOC_F(&a, MK);
        m->d_probs = ALLOC_F(&a, M * E), m->d_rlogits = ALLOC_F(&a, M * E);
    }
    m->router_bias = ALLOC_F(&a, (size_t)m->L * (E ? E : 1));
    const size_t BE = (size_t)B * (E ? E : 1);
    m->rstats_bytes = sizeof(double) * (BE + 2 + E) + sizeof(int32_t) * BE;
    m->d_rstats = take(&a, m->rstats_bytes);
    m->d_lbl = ALLOC_F(&a, (size_t)m->L * (BE + E));
    const size_t ME = M * (E ? E : 1);
    int host_failed = !(m->h_logits = malloc(sizeof(float) * ME)) | !(m->h_scores = malloc(sizeof(float) * ME)) |
                      !(m->h_tmp = malloc(sizeof(float) * (ME > M ? ME : M))) |
                      !(m->h_idx = malloc(sizeof(int32_t) * MK)) | !(m->h_route = malloc(sizeof(int32_t) * MK)) |
                      !(m->h_selected = malloc(sizeof(int32_t) * (E ? E : 1))) |
                      !(m->h_bias = malloc(sizeof(float) * m->L * (E ? E : 1))) |
                      !(m->h_lbl = calloc((size_t)m->L * (BE + E), sizeof(float)));
    const size_t slots = (m->rstats_bytes + sizeof(int32_t) * (E ? E : 1)) * m->L;
    host_failed |= !(m->h_rstats = be->host_alloc ? be->host_alloc(slots) : malloc(slots));
    host_failed |= !(m->h_score_mean = malloc(sizeof(double) * (E ? E : 1))) |
                   !(m->h_seq_score_mean = malloc(sizeof(double) * BE)) |
                   !(m->h_g = calloc(BE + E, sizeof(double))) | !(m->h_tempered_a = calloc(m->L, sizeof(double)));
    if (m->balance.has_host_loss)
        /* one slot per layer, plus one that evaluations write into so they never touch a pending backward's */
        host_failed |= !(m->h_dscores = malloc(sizeof(float) * ME * (m->L + 1))) |
                       !(m->h_dlogits = malloc(sizeof(float) * ME * (m->L + 1)));
    host_failed |= route_stats_alloc(&m->stats, m->L, m->E) | route_stats_alloc(&m->eval_stats, m->L, m->E);
    if (a.failed || host_failed) {
        model_free(m);
        return ml_errf(err, ML_ERUN, "out of memory allocating activations for train.batch=%d", B);
    }
    if (be->prepare) {
        /* the widest activation a GEMM gets (weights are the backend's own business): logits and their
         * gradient (M, V), the router's (M, E), the FFNs' and attention's (widest), the experts' (M k, 2F) */
        size_t widest_gemm = M * (widest > (size_t)m->V ? widest : (size_t)m->V);
        widest_gemm = widest_gemm > M * E ? widest_gemm : M * E;
        if (E && K) widest_gemm = widest_gemm > MK * 2 * m->F ? widest_gemm : MK * 2 * m->F;
        widest_gemm = widest_gemm > MK * C ? widest_gemm : MK * C;
        ml_backend_plan plan = {.max_gemm_floats = widest_gemm, .M = (int)M, .kmax = m->kmax,
                                .E = m->E, .C = m->C, .B = B, .T = m->T, .H = m->H, .KV = m->KV, .hd = m->hd};
        be->prepare(&plan);
    }
    if (be->bind_params) be->bind_params(m->params, m->nparams);
    /* the RoPE table is computed on the host, like every constant, then copied to the backend */
    float *cs = malloc(sizeof(float) * m->T * m->hd), *sn = cs + (size_t)m->T * m->hd / 2;
    rope_table(cs, sn, m->T, m->hd, cfg->model.rope_theta);
    be->from_host(m->rope_cos, cs, sizeof(float) * m->T * m->hd / 2);
    be->from_host(m->rope_sin, sn, sizeof(float) * m->T * m->hd / 2);
    free(cs);
    return ML_OK;
}

void model_free(ml_model *m) {
    if (!m->be) return;
    const ml_backend *be = m->be;
    void *arena_ptrs[] = {m->params, m->grads, m->adam_m, m->adam_v, m->res_final, m->lnf, m->rstdf, m->logits,
                          m->losses, m->rope_cos, m->rope_sin, m->tokens, m->targets, m->d_res, m->d_ln, m->d_a,
                          m->d_b, m->d_q, m->d_k, m->d_v, m->d_qn, m->d_kn, m->d_logits, m->d_xe, m->d_eh13,
                          m->d_eact, m->d_ye, m->d_gate, m->d_probs, m->d_rlogits, m->router_bias, m->d_rstats, m->d_lbl};
    for (size_t i = 0; i < sizeof arena_ptrs / sizeof arena_ptrs[0]; i++)
        if (arena_ptrs[i]) be->free(arena_ptrs[i]);
    for (int l = 0; l < m->L; l++) {
        void **p = (void **)&m->acts[l];
        for (size_t i = 0; i < sizeof(ml_block_acts) / sizeof(void *); i++)
            if (p[i]) be->free(p[i]);
    }
    free(m->h_logits), free(m->h_scores), free(m->h_tmp), free(m->h_idx), free(m->h_route);
    free(m->h_selected), free(m->h_dscores), free(m->h_dlogits), free(m->h_bias), free(m->h_lbl);
    if (m->h_rstats) be->host_free ? be->host_free(m->h_rstats) : free(m->h_rstats);
    free(m->h_score_mean), free(m->h_seq_score_mean), free(m->h_g), free(m->h_tempered_a);
    route_stats_free(&m->stats);
    route_stats_free(&m->eval_stats);
    memset(m, 0, sizeof *m);
}

/* Each tensor is drawn in chunks of INIT_CHUNK values, chunk c of tensor i from its own generator seeded with
 * (seed, i, c): the same weights for any thread count, and the 1.4 B parameters of a 4-layer Sigma-MoE-Tiny
 * drawn on all cores (one core took about a minute). */
enum { INIT_CHUNK = 1 << 20 };
int model_init_weights(ml_model *m, uint64_t seed, ml_err *err) {
    size_t ntasks = 0, n = 0;
    for (int i = 0; i < m->ntensors; i++) ntasks += (m->tensors[i].numel + INIT_CHUNK - 1) / INIT_CHUNK;
    float *host = malloc(sizeof(float) * (m->nparams ? m->nparams : 1));
    int *task_tensor = malloc(sizeof(int) * (ntasks ? ntasks : 1));
    size_t *task_chunk = malloc(sizeof(size_t) * (ntasks ? ntasks : 1));
    if (!host || !task_tensor || !task_chunk) {
        free(host), free(task_tensor), free(task_chunk);
        return ml_errf(err, ML_ERUN, "out of host memory drawing %zu initial weights", m->nparams);
    }
    const float std = m->cfg.model.init_std, out_std = std / sqrtf(2.0f * m->L);
    for (int i = 0; i < m->ntensors; i++)
        for (size_t c = 0; c * INIT_CHUNK < m->tensors[i].numel; c++) task_tensor[n] = i, task_chunk[n++] = c;
#pragma omp parallel for schedule(dynamic)
    for (size_t task = 0; task < ntasks; task++) {
        const ml_tensor *t = &m->tensors[task_tensor[task]];
        const size_t lo = task_chunk[task] * INIT_CHUNK, hi = lo + INIT_CHUNK < t->numel ? lo + INIT_CHUNK : t->numel;
        float *w = host + t->offset;
        if (!t->decay) { /* norms */
            for (size_t j = lo; j < hi; j++) w[j] = 1.0f;
            continue;
        }
        /* GPT-2: projections into the residual stream get std / sqrt(2L) */
        const int residual_out = strstr(t->name, ".wo") || strstr(t->name, "w2");
        const float s = residual_out ? out_std : std;
        ml_rng rng; /* seeded through a hash of (seed, tensor, chunk): distinct streams for distinct triples */
        rng_seed(&rng, seed);
        rng_seed(&rng, rng_next(&rng) ^ (uint64_t)task_tensor[task]);
        rng_seed(&rng, rng_next(&rng) ^ (uint64_t)task_chunk[task]);
        for (size_t j = lo; j < hi; j++) w[j] = (float)(rng_normal(&rng) * s);
    }
    m->be->from_host(m->params, host, sizeof(float) * m->nparams);
    free(task_tensor), free(task_chunk), free(host);
    return ML_OK;
}

/* ---------------------------------------------------------------- forward */

static ml_router_params router_params(const ml_model *m, int l) {
    ml_router_params p = {.E = m->E, .k = m->layer_k[l], .score = m->cfg.model.score,
                          .softmax_order = m->cfg.model.softmax_order, .norm_topk = m->cfg.model.norm_topk,
                          .route_scale = m->cfg.model.route_scale};
    return p;
}

static void attention_block_forward(ml_model *m, int l, float *scratch_out) {
    const ml_backend *be = m->be;
    const ml_block_tensors *w = &m->p.block[l];
    ml_block_acts *x = &m->acts[l];
    const int B = m->B, T = m->T, M = B * T, C = m->C, H = m->H, KV = m->KV, hd = m->hd;
    be->rmsnorm_forward(x->ln1, x->rstd1, x->res_in, w->attn_norm, M, C, m->cfg.model.norm_eps);
    be->matmul_forward(x->q_raw, x->ln1, w->wq, M, C, H * hd);
    be->matmul_forward(x->k_raw, x->ln1, w->wk, M, C, KV * hd);
    be->matmul_forward(x->v, x->ln1, w->wv, M, C, KV * hd);
    const float *q_in = x->q_raw, *k_in = x->k_raw;
    if (m->cfg.model.qk_norm) {
        be->rmsnorm_forward(x->q_normed, x->q_rstd, x->q_raw, w->q_norm, M * H, hd, m->cfg.model.norm_eps);
        be->rmsnorm_forward(x->k_normed, x->k_rstd, x->k_raw, w->k_norm, M * KV, hd, m->cfg.model.norm_eps);
        q_in = x->q_normed, k_in = x->k_normed;
    }
    be->rope_forward(x->q, q_in, m->rope_cos, m->rope_sin, B, T, H, hd);
    be->rope_forward(x->k, k_in, m->rope_cos, m->rope_sin, B, T, KV, hd);
    be->attention_forward(x->atty, x->att, x->q, x->k, x->v, B, T, H, KV, hd);
    be->matmul_forward(scratch_out, x->atty, w->wo, M, H * hd, C);
    be->add_forward(x->res_mid, x->res_in, scratch_out, (size_t)M * C);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A stream id for policies that draw (forced_balance random): distinct per seed, step, micro-batch, layer. */
static uint64_t policy_stream(const ml_model *m, int l) {
    const ml_route_stats *st = m->eval_mode ? &m->eval_stats : &m->stats;
    uint64_t h = m->cfg.seed * 0x9e3779b97f4a7c15ULL ^ m->tokens_seen * 0xbf58476d1ce4e5b9ULL;
    h ^= ((uint64_t)st->micro_batches << 32 | (uint64_t)l << 1 | (uint64_t)m->eval_mode) * 0x94d049bb133111ebULL;
    return h;
}

/* The layout of d_rstats and of each layer's host slot: per-sequence score sums (B, E), the z-loss's sum, the
 * chosen scores' sum, the tempered softmax sums (E) as doubles, then per-sequence choices (B, E) as ints; a
 * host slot ends with the layer's loads (E ints). */
typedef struct {
    double *psum, *zsum, *ssum, *fsum;
    int32_t *seq_selected, *loads;
} rstats_view;

static rstats_view rstats_at(const ml_model *m, void *base) {
    const size_t BE = (size_t)m->B * m->E;
    rstats_view v = {.psum = base, .zsum = (double *)base + BE};
    v.ssum = v.zsum + 1, v.fsum = v.ssum + 1;
    v.seq_selected = (int32_t *)(v.fsum + m->E);
    v.loads = (int32_t *)((char *)base + m->rstats_bytes);
    return v;
}

/* Layer l's host slot. */
static rstats_view rstats_slot(const ml_model *m, int l) {
    return rstats_at(m, (char *)m->h_rstats + (m->rstats_bytes + sizeof(int32_t) * m->E) * l);
}

/* What the policies read of layer l, from its host slot: totals over the micro-batch (h_selected,
 * h_score_mean) and per sequence (h_seq_score_mean), the tempered loss's sums. */
static void unpack_stats(ml_model *m, int l, ml_balance_layer *ctx) {
    const int B = m->B, T = m->T, E = m->E, M = B * T;
    const rstats_view v = rstats_slot(m, l);
    for (int e = 0; e < E; e++) {
        double ps = 0;
        int32_t sel = 0;
        for (int b = 0; b < B; b++) {
            ps += v.psum[(size_t)b * E + e], sel += v.seq_selected[(size_t)b * E + e];
            m->h_seq_score_mean[(size_t)b * E + e] = v.psum[(size_t)b * E + e] / T;
        }
        m->h_score_mean[e] = ps / M, m->h_selected[e] = sel;
    }
    ctx->selected = m->h_selected, ctx->score_mean = m->h_score_mean;
    ctx->seq_selected = v.seq_selected, ctx->seq_score_mean = m->h_seq_score_mean;
    ctx->tempered_fsum = v.fsum, ctx->tempered_ssum = *v.ssum;
}

/* Records layer l of a forward with targets (after unpack_stats; its loads in its slot): loads after drops,
 * choices, mean normalised scores, drops, the balancing losses' values; their gradients' weights (device
 * forms: h_lbl, uploaded once per forward) or gradients (host forms: h_dscores, h_dlogits) for the backward. */
static void record_layer(ml_model *m, int l, ml_balance_layer *ctx) {
    const ml_balance *bal = &m->balance;
    ml_route_stats *st = m->eval_mode ? &m->eval_stats : &m->stats;
    const int M = m->B * m->T, E = m->E;
    const size_t BE = (size_t)m->B * E;
    const rstats_view v = rstats_slot(m, l);
    const int32_t *counts = v.loads;
    int64_t *load = st->tokens_per_expert + (size_t)l * E, *sel = st->selected + (size_t)l * E;
    double *gate_mean = st->gate_mean_sum + (size_t)l * E;
    int64_t dropped = 0; /* choices made minus choices that reached an expert */
    for (int e = 0; e < E; e++) {
        load[e] += counts[e], sel[e] += m->h_selected[e], gate_mean[e] += m->h_score_mean[e];
        dropped += m->h_selected[e] - counts[e];
    }
    st->dropped[l] += dropped;

    ctx->running_selected = sel;
    ctx->running_tokens = (int64_t)(st->micro_batches + 1) * M;
    double loss = 0;
    if (bal->has_loss && !bal->has_host_loss) {
        /* device forms: the value from the reduced sums; the gradients' weights kept for the backward */
        double *g = m->h_g, *c = g + BE, a = 0;
        loss = balance_device_loss(bal, &m->cfg, ctx, *v.zsum, g, c, &a);
        if (!m->eval_mode) {
            float *gf = m->h_lbl + (size_t)l * (BE + E);
            for (size_t i = 0; i < BE + E; i++) gf[i] = (float)g[i];
            m->h_tempered_a[l] = a;
        }
    } else if (bal->has_loss) {
        const int slot = m->eval_mode ? m->L : l;
        ctx->dscores = m->h_dscores + (size_t)slot * M * E;
        ctx->dlogits = m->h_dlogits + (size_t)slot * M * E;
        memset(ctx->dscores, 0, sizeof(float) * M * E);
        memset(ctx->dlogits, 0, sizeof(float) * M * E);
        loss = balance_loss(bal, &m->cfg, ctx);
    }
    st->policy_loss[l] += loss;
    m->last_aux += (float)loss;
}

/* The MoE FFN of block l: out(M,C) = sum_j gate_j expert_j(ln2) + shared(ln2). The policies may assign the
 * experts and drop assignments over capacity; with record, the routing statistics and the policies' losses
 * (and, outside eval_mode, their gradients for the backward) are recorded. */
static void moe_block_forward(ml_model *m, int l, float *out, int record) {
    const ml_backend *be = m->be;
    const ml_balance *bal = &m->balance;
    const ml_block_tensors *w = &m->p.block[l];
    ml_block_acts *x = &m->acts[l];
    const int M = m->B * m->T, C = m->C, E = m->E, k = m->layer_k[l], F = m->F;
    ml_router_params rp = router_params(m, l);
    const float *bias = m->router_bias + (size_t)l * E;
    ml_balance_layer ctx = {.layer = l, .M = M, .E = E, .k = k, .B = m->B, .T = m->T,
                            .logits = m->h_logits, .scores = m->h_scores, .idx = m->h_idx};

    /* the policies run on the host: they get copies of what they read; the statistics are reduced on the
     * backend, so a layer moves 3E numbers per sequence and a few sums */
    const int host_scores = bal->has_host_loss || bal->has_host_cap;
    const int host_logits = bal->has_host_loss; /* assign reads only the shapes and the stream */
    if (m->time_routing) be->sync(); /* routing's time, not that of the work queued before it */
    double t0 = now_s();
    be->matmul_forward(x->logits, x->ln2, w->router, M, C, E);
    if (host_logits) be->to_host(m->h_logits, x->logits, sizeof(float) * M * E);
    if (bal->has_assign) {
        ctx.stream = policy_stream(m, l);
        balance_assign(bal, &m->cfg, &ctx, m->h_idx);
        be->from_host(x->idx, m->h_idx, sizeof(int32_t) * M * k);
        rp.given_idx = 1;
    }
    be->router_forward(x->probs, x->idx, x->gate, x->logits, bias, M, &rp);
    /* the reduced statistics (per sequence, for seq_aux_loss) and the device-form losses' sums, one copy */
    const int device_loss = record && bal->has_loss && !bal->has_host_loss;
    const rstats_view d = rstats_at(m, m->d_rstats), h = rstats_slot(m, l);
    be->route_stats(d.psum, d.seq_selected, x->probs, x->idx, M, k, E, m->T);
    if (device_loss && bal->z_coef > 0) be->zloss_forward(d.zsum, x->logits, M, E);
    if (device_loss && bal->tempered)
        be->tempered_forward(d.fsum, d.ssum, x->logits, x->probs, x->idx, (float)bal->tempered->tau(&m->cfg), M, k,
                             E);
    /* a policy that reads scores on the host needs the statistics now; otherwise they travel while the
     * experts run and are recorded at the end of the forward */
    const int defer = record && !host_scores && be->to_host_async;
    if (defer) {
        be->to_host_async(h.psum, m->d_rstats, m->rstats_bytes);
    } else {
        be->to_host(h.psum, m->d_rstats, m->rstats_bytes);
        unpack_stats(m, l, &ctx);
    }
    if (host_scores) {
        be->to_host(m->h_scores, x->probs, sizeof(float) * M * E);
        be->to_host(m->h_idx, x->idx, sizeof(int32_t) * M * k);
    }

    const int32_t *route = x->idx;
    if (bal->has_host_cap) {
        memcpy(m->h_route, m->h_idx, sizeof(int32_t) * M * k);
        balance_cap(bal, &m->cfg, &ctx, m->h_route);
        be->from_host(x->route, m->h_route, sizeof(int32_t) * M * k);
        route = x->route;
    } else if (bal->has_cap) {
        /* the device form: dispatch the choices, drop by rank within each expert, dispatch what is left */
        int by_score;
        const int cap = balance_cap_limit(bal, &m->cfg, &ctx, &by_score);
        if (cap >= 0) {
            be->moe_dispatch(x->counts, x->offsets, x->slot, x->idx, M, k, E);
            be->capacity_route(x->route, x->idx, x->probs, x->offsets, x->slot, cap, by_score, M, k, E);
            route = x->route;
        }
    }
    be->moe_dispatch(x->counts, x->offsets, x->slot, route, M, k, E);
    /* the routed rows, read while the device has only routing queued (the backward reuses them) */
    int rows;
    be->to_host(&rows, x->offsets + E, sizeof rows);
    m->moe_rows[l] = rows;
    if (m->time_routing) be->sync();
    m->routing_seconds += now_s() - t0;
    be->permute_forward(x->xe, x->ln2, x->slot, M, k, C);
    be->grouped_matmul_forward(x->eh13, x->xe, w->expert_w13, x->offsets, E, C, 2 * F);
    be->swiglu_forward(x->eact, x->eh13, rows, F);
    be->grouped_matmul_forward(x->ye, x->eact, w->expert_w2, x->offsets, E, F, C);
    be->memset0(out, sizeof(float) * M * C);
    be->unpermute_forward(out, x->ye, x->gate, x->slot, M, k, C);
    if (m->Fs) {
        be->matmul_forward(x->sh13, x->ln2, w->shared_w13, M, C, 2 * m->Fs);
        be->swiglu_forward(x->sact, x->sh13, M, m->Fs);
        float *tmp = m->d_a; /* free during the forward */
        be->matmul_forward(tmp, x->sact, w->shared_w2, M, m->Fs, C);
        be->add_forward(out, out, tmp, (size_t)M * C);
    }
    if (!record) return;
    t0 = now_s();
    if (defer) {
        be->to_host_async(h.loads, x->counts, sizeof(int32_t) * E);
        m->rstats_pending[l] = 1;
    } else {
        be->to_host(h.loads, x->counts, sizeof(int32_t) * E);
        record_layer(m, l, &ctx);
    }
    m->routing_seconds += now_s() - t0;
}

static void dense_block_forward(ml_model *m, int l, float *out) {
    const ml_backend *be = m->be;
    const ml_block_tensors *w = &m->p.block[l];
    ml_block_acts *x = &m->acts[l];
    const int M = m->B * m->T;
    be->matmul_forward(x->h13, x->ln2, w->dense_w13, M, m->C, 2 * m->Fd);
    be->swiglu_forward(x->act, x->h13, M, m->Fd);
    be->matmul_forward(out, x->act, w->dense_w2, M, m->Fd, m->C);
}

float model_forward(ml_model *m, const int32_t *tokens, const int32_t *targets) {
    const ml_backend *be = m->be;
    const int M = m->B * m->T, C = m->C;
    be->from_host(m->tokens, tokens, sizeof(int32_t) * M);
    m->last_aux = 0;
    float *branch = m->d_ln; /* scratch for a block's branch output; the backward scratch is idle now */
    be->encoder_forward(m->acts[0].res_in, m->tokens, m->p.wte, M, C);
    for (int l = 0; l < m->L; l++) {
        ml_block_acts *x = &m->acts[l];
        attention_block_forward(m, l, branch);
        be->rmsnorm_forward(x->ln2, x->rstd2, x->res_mid, m->p.block[l].ffn_norm, M, C, m->cfg.model.norm_eps);
        if (m->layer_k[l] == 0) dense_block_forward(m, l, branch);
        else moe_block_forward(m, l, branch, targets != NULL);
        float *next = l + 1 < m->L ? m->acts[l + 1].res_in : m->res_final;
        be->add_forward(next, x->res_mid, branch, (size_t)M * C);
    }
    be->rmsnorm_forward(m->lnf, m->rstdf, m->res_final, m->p.final_norm, M, C, m->cfg.model.norm_eps);
    be->matmul_forward(m->logits, m->lnf, m->p.lm_head, M, C, m->V);
    if (!targets) return 0;
    be->from_host(m->targets, targets, sizeof(int32_t) * M);
    be->crossentropy_forward(m->losses, m->logits, m->targets, M, m->V);
    be->to_host(m->h_tmp, m->losses, sizeof(float) * M); /* waits for everything queued, the statistics too */
    double sum = 0;
    for (int i = 0; i < M; i++) sum += m->h_tmp[i];
    m->last_loss = (float)(sum / M);
    const double t0 = now_s();
    for (int l = 0; l < m->L; l++)
        if (m->rstats_pending[l]) {
            ml_balance_layer ctx = {.layer = l, .M = M, .E = m->E, .k = m->layer_k[l], .B = m->B, .T = m->T};
            unpack_stats(m, l, &ctx);
            record_layer(m, l, &ctx);
            m->rstats_pending[l] = 0;
        }
    if (m->E && m->balance.has_loss && !m->balance.has_host_loss && !m->eval_mode)
        be->from_host(m->d_lbl, m->h_lbl, sizeof(float) * m->L * ((size_t)m->B * m->E + m->E));
    m->routing_seconds += now_s() - t0;
    ml_route_stats *st = m->eval_mode ? &m->eval_stats : &m->stats;
    st->micro_batches++;
    st->tokens += M;
    return m->last_loss;
}

/* ---------------------------------------------------------------- backward */

static void moe_block_backward(ml_model *m, int l, const float *dout, float loss_scale) {
    const ml_backend *be = m->be;
    const ml_block_tensors *w = &m->p.block[l], *g = &m->g.block[l];
    ml_block_acts *x = &m->acts[l];
    const int M = m->B * m->T, C = m->C, E = m->E, k = m->layer_k[l], F = m->F;
    const ml_router_params rp = router_params(m, l);
    const int rows = m->moe_rows[l]; /* from the forward: no wait for the work queued before this block */

    be->memset0(m->d_ln, sizeof(float) * M * C);
    if (m->Fs) {
        be->memset0(m->d_a, sizeof(float) * M * m->Fs);
        be->matmul_backward(m->d_a, g->shared_w2, dout, x->sact, w->shared_w2, M, m->Fs, C);
        be->memset0(m->d_b, sizeof(float) * M * 2 * m->Fs);
        be->swiglu_backward(m->d_b, m->d_a, x->sh13, M, m->Fs);
        be->matmul_backward(m->d_ln, g->shared_w13, m->d_b, x->ln2, w->shared_w13, M, C, 2 * m->Fs);
    }
    be->memset0(m->d_ye, sizeof(float) * rows * C);
    be->memset0(m->d_gate, sizeof(float) * M * k);
    be->unpermute_backward(m->d_ye, m->d_gate, dout, x->ye, x->gate, x->slot, M, k, C);
    be->memset0(m->d_eact, sizeof(float) * rows * F);
    be->grouped_matmul_backward(m->d_eact, g->expert_w2, m->d_ye, x->eact, w->expert_w2, x->offsets, E, F, C);
    be->memset0(m->d_eh13, sizeof(float) * rows * 2 * F);
    be->swiglu_backward(m->d_eh13, m->d_eact, x->eh13, rows, F);
    be->memset0(m->d_xe, sizeof(float) * rows * C);
    be->grouped_matmul_backward(m->d_xe, g->expert_w13, m->d_eh13, x->xe, w->expert_w13, x->offsets, E, C, 2 * F);
    be->permute_backward(m->d_ln, m->d_xe, x->slot, M, k, C);

    if (m->time_routing) be->sync();
    const double t0 = now_s();
    /* the policies' gradients, kept from the forward, scaled like the rest of this micro-batch's loss */
    float *dprobs = NULL;
    const ml_balance *bal = &m->balance;
    if (bal->has_loss && !bal->has_host_loss) {
        const size_t BE = (size_t)m->B * E;
        const float *g = m->d_lbl + (size_t)l * (BE + E), *c = g + BE;
        be->memset0(m->d_probs, sizeof(float) * M * E);
        be->memset0(m->d_rlogits, sizeof(float) * M * E);
        if (bal->has_lbl) be->lbl_backward(m->d_probs, x->probs, g, loss_scale / m->T, M, E, m->T);
        if (bal->z_coef > 0)
            be->zloss_backward(m->d_rlogits, x->logits, (float)(loss_scale * 2 * bal->z_coef / M), M, E);
        if (bal->tempered)
            be->tempered_backward(m->d_rlogits, m->d_probs, x->logits, x->idx, c, loss_scale,
                                  (float)(loss_scale * m->h_tempered_a[l]), (float)bal->tempered->tau(&m->cfg), M, k,
                                  E);
        dprobs = m->d_probs;
    } else if (bal->has_loss) {
        const size_t ME = (size_t)M * E;
        const float *ds = m->h_dscores + (size_t)l * ME, *dl = m->h_dlogits + (size_t)l * ME;
        for (size_t i = 0; i < ME; i++) m->h_tmp[i] = ds[i] * loss_scale;
        be->from_host(m->d_probs, m->h_tmp, sizeof(float) * ME);
        for (size_t i = 0; i < ME; i++) m->h_tmp[i] = dl[i] * loss_scale;
        be->from_host(m->d_rlogits, m->h_tmp, sizeof(float) * ME);
        dprobs = m->d_probs;
    } else {
        be->memset0(m->d_rlogits, sizeof(float) * M * E);
    }
    be->router_backward(m->d_rlogits, m->d_gate, dprobs, x->logits, x->probs, x->idx, x->gate, M, &rp);
    be->matmul_backward(m->d_ln, g->router, m->d_rlogits, x->ln2, w->router, M, C, E);
    if (m->time_routing) be->sync();
    m->routing_seconds += now_s() - t0;
}

static void dense_block_backward(ml_model *m, int l, const float *dout) {
    const ml_backend *be = m->be;
    const ml_block_tensors *w = &m->p.block[l], *g = &m->g.block[l];
    ml_block_acts *x = &m->acts[l];
    const int M = m->B * m->T, C = m->C, Fd = m->Fd;
    be->memset0(m->d_ln, sizeof(float) * M * C);
    be->memset0(m->d_a, sizeof(float) * M * Fd);
    be->matmul_backward(m->d_a, g->dense_w2, dout, x->act, w->dense_w2, M, Fd, C);
    be->memset0(m->d_b, sizeof(float) * M * 2 * Fd);
    be->swiglu_backward(m->d_b, m->d_a, x->h13, M, Fd);
    be->matmul_backward(m->d_ln, g->dense_w13, m->d_b, x->ln2, w->dense_w13, M, C, 2 * Fd);
}

static void attention_block_backward(ml_model *m, int l) {
    const ml_backend *be = m->be;
    const ml_block_tensors *w = &m->p.block[l], *g = &m->g.block[l];
    ml_block_acts *x = &m->acts[l];
    const int B = m->B, T = m->T, M = B * T, C = m->C, H = m->H, KV = m->KV, hd = m->hd;
    float *d_atty = m->d_a;
    be->memset0(d_atty, sizeof(float) * M * H * hd);
    be->matmul_backward(d_atty, g->wo, m->d_res, x->atty, w->wo, M, H * hd, C);
    be->memset0(m->d_q, sizeof(float) * M * H * hd);
    be->memset0(m->d_k, sizeof(float) * M * KV * hd);
    be->memset0(m->d_v, sizeof(float) * M * KV * hd);
    be->attention_backward(m->d_q, m->d_k, m->d_v, d_atty, x->atty, x->att, x->q, x->k, x->v, B, T, H, KV, hd);
    be->memset0(m->d_qn, sizeof(float) * M * H * hd);
    be->memset0(m->d_kn, sizeof(float) * M * KV * hd);
    be->rope_backward(m->d_qn, m->d_q, m->rope_cos, m->rope_sin, B, T, H, hd);
    be->rope_backward(m->d_kn, m->d_k, m->rope_cos, m->rope_sin, B, T, KV, hd);
    float *dq_raw = m->d_qn, *dk_raw = m->d_kn;
    if (m->cfg.model.qk_norm) {
        /* reuse d_q / d_k (consumed by rope_backward) for the gradients before the QK-norm */
        be->memset0(m->d_q, sizeof(float) * M * H * hd);
        be->memset0(m->d_k, sizeof(float) * M * KV * hd);
        be->rmsnorm_backward(m->d_q, g->q_norm, m->d_qn, x->q_raw, w->q_norm, x->q_rstd, M * H, hd);
        be->rmsnorm_backward(m->d_k, g->k_norm, m->d_kn, x->k_raw, w->k_norm, x->k_rstd, M * KV, hd);
        dq_raw = m->d_q, dk_raw = m->d_k;
    }
    be->memset0(m->d_ln, sizeof(float) * M * C);
    be->matmul_backward(m->d_ln, g->wq, dq_raw, x->ln1, w->wq, M, C, H * hd);
    be->matmul_backward(m->d_ln, g->wk, dk_raw, x->ln1, w->wk, M, C, KV * hd);
    be->matmul_backward(m->d_ln, g->wv, m->d_v, x->ln1, w->wv, M, C, KV * hd);
    be->rmsnorm_backward(m->d_res, g->attn_norm, m->d_ln, x->res_in, w->attn_norm, x->rstd1, M, C);
}

void model_backward(ml_model *m, float loss_scale) {
    const ml_backend *be = m->be;
    const int M = m->B * m->T, C = m->C;
    be->memset0(m->d_logits, sizeof(float) * M * m->V);
    be->crossentropy_backward(m->d_logits, m->logits, m->targets, loss_scale / M, M, m->V);
    be->memset0(m->d_ln, sizeof(float) * M * C);
    be->matmul_backward(m->d_ln, m->g.lm_head, m->d_logits, m->lnf, m->p.lm_head, M, C, m->V);
    be->memset0(m->d_res, sizeof(float) * M * C);
    be->rmsnorm_backward(m->d_res, m->g.final_norm, m->d_ln, m->res_final, m->p.final_norm, m->rstdf, M, C);
    for (int l = m->L - 1; l >= 0; l--) {
        ml_block_acts *x = &m->acts[l];
        /* d_res is d(block output): it flows unchanged to res_mid and, through the FFN branch, adds to it */
        if (m->layer_k[l] == 0) dense_block_backward(m, l, m->d_res);
        else moe_block_backward(m, l, m->d_res, loss_scale);
        be->rmsnorm_backward(m->d_res, m->g.block[l].ffn_norm, m->d_ln, x->res_mid, m->p.block[l].ffn_norm, x->rstd2,
                             M, C);
        attention_block_backward(m, l);
    }
    be->encoder_backward(m->g.wte, m->d_res, m->tokens, M, C);
}

/* ---------------------------------------------------------------- optimizer */

/* Zeroes the gradients. Where the backend defers zeroing (zero_deferred), the experts' weight gradients (most
 * of a MoE model's parameters) are left to the grouped backward that writes them whole; the runs of other
 * tensors between them are zeroed now. */
void model_zero_grad(ml_model *m) {
    const ml_backend *be = m->be;
    if (!be->zero_deferred) {
        be->memset0(m->grads, sizeof(float) * m->nparams);
        return;
    }
    size_t run = 0; /* the first float not yet zeroed or deferred (tensors lie in the arena in offset order) */
    for (int i = 0; i < m->ntensors; i++) {
        const ml_tensor *x = &m->tensors[i];
        const float *g = m->grads + x->offset;
        int expert = 0;
        for (int l = 0; l < m->L && !expert; l++)
            expert = g == m->g.block[l].expert_w13 || g == m->g.block[l].expert_w2;
        if (!expert) continue;
        if (x->offset > run) be->memset0(m->grads + run, sizeof(float) * (x->offset - run));
        be->zero_deferred(m->grads + x->offset, sizeof(float) * x->numel);
        run = x->offset + x->numel;
    }
    if (m->nparams > run) be->memset0(m->grads + run, sizeof(float) * (m->nparams - run));
}

void model_begin_step(ml_model *m, uint64_t tokens_seen) {
    m->tokens_seen = tokens_seen;
    balance_choose_k(&m->balance, &m->cfg, tokens_seen, m->layer_k);
    route_stats_reset(&m->stats);
}

void model_end_step(ml_model *m) {
    if (!m->balance.has_after_step || !m->E) return;
    const size_t n = (size_t)m->L * m->E;
    float *bias = m->h_bias;
    m->be->to_host(bias, m->router_bias, sizeof(float) * n);
    balance_after_step(&m->balance, &m->cfg, &m->stats, m->layer_k, bias);
    m->be->from_host(m->router_bias, bias, sizeof(float) * n);
}

double model_grad_norm(ml_model *m) { return sqrt(m->be->sumsq(m->grads, m->nparams)); }

void model_adamw(ml_model *m, float lr, float grad_scale, int t) {
    const ml_config *c = &m->cfg;
    for (int i = 0; i < m->ntensors; i++) {
        const ml_tensor *x = &m->tensors[i];
        m->be->adamw_update(m->params + x->offset, m->grads + x->offset, m->adam_m + x->offset,
                            m->adam_v + x->offset, x->numel, lr, c->train.beta1, c->train.beta2, c->train.eps,
                            x->decay ? c->train.weight_decay : 0.0f, grad_scale, t);
    }
}

/* ---------------------------------------------------------------- sizes */

size_t model_param_count(const ml_config *cfg) {
    ml_model *m = calloc(1, sizeof *m);
    set_dims(m, cfg, 1);
    config_layer_k(cfg, m->layer_k, NULL);
    ml_tensors table;
    build_table(m, &table);
    size_t n = m->nparams;
    free(m);
    return n;
}

double model_active_params(const ml_config *cfg) {
    const typeof(cfg->model) *c = &cfg->model;
    int k[ML_MAX_LAYERS];
    config_layer_k(cfg, k, NULL);
    double hd = c->dim / c->heads, n = 0;
    for (int l = 0; l < c->layers; l++) {
        n += c->dim * hd * (2.0 * c->heads + 2.0 * c->kv_heads);
        if (k[l] == 0) n += 3.0 * c->dim * c->dense_ffn;
        else n += c->dim * c->experts + 3.0 * c->dim * c->expert_ffn * k[l]
                  + 3.0 * c->dim * c->shared_ffn * c->shared_experts;
    }
    return n + (double)c->vocab * c->dim; /* the LM head (the embedding lookup costs no FLOPs) */
}
