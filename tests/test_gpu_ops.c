/* test_gpu_ops.c: the CUDA backend against the CPU backend, op by op, forward and backward, on fresh random
 * inputs; then a whole fp32 training step of the model on both, and the same seed twice on the GPU.
 * Bounds (fp32 everywhere): relative error (max |gpu - cpu| / max |cpu|) below 1e-5 for elementwise ops and
 * 1e-4 for reductions and GEMMs (different summation orders); indices and counts exactly equal.
 * Without a usable GPU it prints why and exits 77, which meson reports as SKIP. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "config.h"
#include "model.h"
#include "rng.h"
#ifdef ML_HAVE_CUDA
#include "backend_cuda.h"
#endif

#ifndef ML_HAVE_CUDA
int main(void) {
    printf("SKIP: moelab was built without the CUDA backend (no nvcc at build time)\n");
    return 77;
}
#else

static const ml_backend *cpu, *gpu;
static ml_rng rng;

static float *randv(size_t n, float scale) {
    float *h = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) h[i] = scale * (2.0f * (float)(rng_next(&rng) >> 40) / (float)(1 << 24) - 1.0f);
    return h;
}
static void *dev(const void *h, size_t bytes) {
    void *d = gpu->alloc(bytes);
    gpu->from_host(d, h, bytes);
    return d;
}
static float *back(const float *d, size_t n) {
    float *h = malloc(sizeof(float) * (n ? n : 1));
    gpu->to_host(h, d, sizeof(float) * n);
    return h;
}
static double rel_err(const float *want, const float *got, size_t n) {
    double num = 0, den = 1e-12;
    for (size_t i = 0; i < n; i++) {
        num = fmax(num, fabs((double)want[i] - got[i]));
        den = fmax(den, fabs((double)want[i]));
    }
    return num / den;
}
/* compares the device buffer d with the host result h (n floats) */
#define SAME(what, h, d, n, tol)                                                                              \
    do {                                                                                                      \
        float *g_ = back(d, n);                                                                               \
        double e_ = rel_err(h, g_, n);                                                                        \
        CHECK(e_ < (tol), "%s: relative error %.3g (bound %.0e)", what, e_, (double)(tol));                   \
        free(g_);                                                                                             \
    } while (0)

enum { M = 64, C = 48, K = 32, N = 40, E = 8, KK = 2, B = 2, T = 16, H = 4, KV = 2, HD = 8, V = 100, F = 24 };

static void test_dense_ops(void) {
    /* encoder */
    int32_t tok[M];
    for (int i = 0; i < M; i++) tok[i] = (int32_t)(rng_next(&rng) % 7); /* repeated ids: accumulation order */
    float *wte = randv(7 * C, 1), *out = calloc(M * C, 4), *dout = randv(M * C, 1), *dwte = calloc(7 * C, 4);
    int32_t *dtok = dev(tok, sizeof tok);
    float *d_wte = dev(wte, 7 * C * 4), *d_out = gpu->alloc(M * C * 4), *d_dout = dev(dout, M * C * 4);
    float *d_dwte = gpu->alloc(7 * C * 4);
    cpu->encoder_forward(out, tok, wte, M, C), gpu->encoder_forward(d_out, dtok, d_wte, M, C);
    SAME("encoder_forward", out, d_out, M * C, 1e-7);
    cpu->encoder_backward(dwte, dout, tok, M, C), gpu->encoder_backward(d_dwte, d_dout, dtok, M, C);
    SAME("encoder_backward", dwte, d_dwte, 7 * C, 1e-5);

    /* matmul */
    float *x = randv(M * K, 1), *w = randv(N * K, 0.5f), *y = calloc(M * N, 4), *dy = randv(M * N, 1);
    float *dx = calloc(M * K, 4), *dw = calloc(N * K, 4);
    float *d_x = dev(x, M * K * 4), *d_w = dev(w, N * K * 4), *d_y = gpu->alloc(M * N * 4), *d_dy = dev(dy, M * N * 4);
    float *d_dx = gpu->alloc(M * K * 4), *d_dw = gpu->alloc(N * K * 4);
    cpu->matmul_forward(y, x, w, M, K, N), gpu->matmul_forward(d_y, d_x, d_w, M, K, N);
    SAME("matmul_forward", y, d_y, M * N, 1e-4);
    cpu->matmul_backward(dx, dw, dy, x, w, M, K, N), gpu->matmul_backward(d_dx, d_dw, d_dy, d_x, d_w, M, K, N);
    SAME("matmul_backward dinp", dx, d_dx, M * K, 1e-4);
    SAME("matmul_backward dw", dw, d_dw, N * K, 1e-4);

    /* rmsnorm */
    float *g = randv(C, 1), *rs = calloc(M, 4), *nx = randv(M * C, 2), *no = calloc(M * C, 4), *dn = calloc(M * C, 4),
          *dg = calloc(C, 4);
    float *d_g = dev(g, C * 4), *d_rs = gpu->alloc(M * 4), *d_nx = dev(nx, M * C * 4), *d_no = gpu->alloc(M * C * 4);
    float *d_dn = gpu->alloc(M * C * 4), *d_dg = gpu->alloc(C * 4);
    cpu->rmsnorm_forward(no, rs, nx, g, M, C, 1e-6f), gpu->rmsnorm_forward(d_no, d_rs, d_nx, d_g, M, C, 1e-6f);
    SAME("rmsnorm_forward", no, d_no, M * C, 1e-5);
    SAME("rmsnorm_forward rstd", rs, d_rs, M, 1e-5);
    cpu->rmsnorm_backward(dn, dg, dout, nx, g, rs, M, C), gpu->rmsnorm_backward(d_dn, d_dg, d_dout, d_nx, d_g, d_rs, M, C);
    SAME("rmsnorm_backward dinp", dn, d_dn, M * C, 1e-4);
    SAME("rmsnorm_backward dw", dg, d_dg, C, 1e-4);

    /* swiglu, add */
    float *h13 = randv(M * 2 * F, 2), *act = calloc(M * F, 4), *da = randv(M * F, 1), *dh = calloc(M * 2 * F, 4);
    float *d_h13 = dev(h13, M * 2 * F * 4), *d_act = gpu->alloc(M * F * 4), *d_da = dev(da, M * F * 4);
    float *d_dh = gpu->alloc(M * 2 * F * 4);
    cpu->swiglu_forward(act, h13, M, F), gpu->swiglu_forward(d_act, d_h13, M, F);
    SAME("swiglu_forward", act, d_act, M * F, 1e-5);
    cpu->swiglu_backward(dh, da, h13, M, F), gpu->swiglu_backward(d_dh, d_da, d_h13, M, F);
    SAME("swiglu_backward", dh, d_dh, M * 2 * F, 1e-5);
    cpu->add_forward(act, act, da, M * F), gpu->add_forward(d_act, d_act, d_da, M * F);
    SAME("add_forward (in place)", act, d_act, M * F, 1e-6);

    /* cross-entropy */
    int32_t tgt[M];
    for (int i = 0; i < M; i++) tgt[i] = (int32_t)(rng_next(&rng) % V);
    float *lg = randv(M * V, 4), *loss = calloc(M, 4), *dl = calloc(M * V, 4);
    int32_t *d_tgt = dev(tgt, sizeof tgt);
    float *d_lg = dev(lg, M * V * 4), *d_loss = gpu->alloc(M * 4), *d_dl = gpu->alloc(M * V * 4);
    cpu->crossentropy_forward(loss, lg, tgt, M, V), gpu->crossentropy_forward(d_loss, d_lg, d_tgt, M, V);
    SAME("crossentropy_forward", loss, d_loss, M, 1e-5);
    cpu->crossentropy_backward(dl, lg, tgt, 0.5f, M, V), gpu->crossentropy_backward(d_dl, d_lg, d_tgt, 0.5f, M, V);
    SAME("crossentropy_backward", dl, d_dl, M * V, 1e-5);

    /* AdamW, sum of squares */
    size_t n = 1000;
    float *p = randv(n, 1), *gr = randv(n, 1), *m1 = randv(n, 0.1f), *v1 = randv(n, 0.1f);
    for (size_t i = 0; i < n; i++) v1[i] = fabsf(v1[i]);
    float *d_p = dev(p, n * 4), *d_gr = dev(gr, n * 4), *d_m1 = dev(m1, n * 4), *d_v1 = dev(v1, n * 4);
    cpu->adamw_update(p, gr, m1, v1, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 3);
    gpu->adamw_update(d_p, d_gr, d_m1, d_v1, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 3);
    SAME("adamw_update param", p, d_p, n, 1e-5);
    SAME("adamw_update v", v1, d_v1, n, 1e-5);
    double a = cpu->sumsq(gr, n), b = gpu->sumsq(d_gr, n);
    CHECK(fabs(a - b) <= 1e-9 * a, "sumsq %.17g vs %.17g", a, b);

    free(wte), free(out), free(dout), free(dwte), free(x), free(w), free(y), free(dy), free(dx), free(dw);
    free(g), free(rs), free(nx), free(no), free(dn), free(dg), free(h13), free(act), free(da), free(dh);
    free(lg), free(loss), free(dl), free(p), free(gr), free(m1), free(v1);
}

static void test_attention(void) {
    float cs[T * HD / 2], sn[T * HD / 2];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < HD / 2; i++) {
            double f = pow(10000.0, -2.0 * i / HD);
            cs[t * HD / 2 + i] = (float)cos(t * f), sn[t * HD / 2 + i] = (float)sin(t * f);
        }
    const size_t nq = (size_t)B * T * H * HD, nk = (size_t)B * T * KV * HD, na = (size_t)B * H * T * T;
    float *q = randv(nq, 1), *k = randv(nk, 1), *v = randv(nk, 1), *o = calloc(nq, 4), *att = calloc(na, 4);
    float *go = randv(nq, 1), *dq = calloc(nq, 4), *dk = calloc(nk, 4), *dv = calloc(nk, 4), *qr = calloc(nq, 4);
    float *d_cs = dev(cs, sizeof cs), *d_sn = dev(sn, sizeof sn);
    float *d_q = dev(q, nq * 4), *d_k = dev(k, nk * 4), *d_v = dev(v, nk * 4), *d_o = gpu->alloc(nq * 4);
    float *d_att = gpu->alloc(na * 4), *d_go = dev(go, nq * 4), *d_dq = gpu->alloc(nq * 4), *d_dk = gpu->alloc(nk * 4);
    float *d_dv = gpu->alloc(nk * 4), *d_qr = gpu->alloc(nq * 4);
    cpu->rope_forward(qr, q, cs, sn, B, T, H, HD), gpu->rope_forward(d_qr, d_q, d_cs, d_sn, B, T, H, HD);
    SAME("rope_forward", qr, d_qr, nq, 1e-6);
    cpu->rope_backward(dq, go, cs, sn, B, T, H, HD), gpu->rope_backward(d_dq, d_go, d_cs, d_sn, B, T, H, HD);
    SAME("rope_backward", dq, d_dq, nq, 1e-6);
    memset(dq, 0, nq * 4), gpu->memset0(d_dq, nq * 4);
    cpu->attention_forward(o, att, q, k, v, B, T, H, KV, HD);
    gpu->attention_forward(d_o, d_att, d_q, d_k, d_v, B, T, H, KV, HD);
    SAME("attention_forward out", o, d_o, nq, 1e-5);
    SAME("attention_forward probabilities", att, d_att, na, 1e-5);
    cpu->attention_backward(dq, dk, dv, go, att, q, k, v, B, T, H, KV, HD);
    gpu->attention_backward(d_dq, d_dk, d_dv, d_go, d_att, d_q, d_k, d_v, B, T, H, KV, HD);
    SAME("attention_backward dq", dq, d_dq, nq, 1e-4);
    SAME("attention_backward dk", dk, d_dk, nk, 1e-4);
    SAME("attention_backward dv", dv, d_dv, nk, 1e-4);
    free(q), free(k), free(v), free(o), free(att), free(go), free(dq), free(dk), free(dv), free(qr);
}

static void test_moe(int score, int order, int norm_topk) {
    char tag[64];
    snprintf(tag, sizeof tag, "[%s, %s, norm %d]", score ? "sigmoid" : "softmax", order ? "after" : "before", norm_topk);
    ml_router_params rp = {.E = E, .k = KK, .score = score, .softmax_order = order, .norm_topk = norm_topk,
                           .route_scale = 1.5f};
    float *lg = randv(M * E, 2), *bias = randv(E, 0.05f), *pr = calloc(M * E, 4), *gt = calloc(M * KK, 4);
    int32_t idx[M * KK], gidx[M * KK];
    lg[0] = lg[1]; /* a tie: the lower index wins on both */
    float *d_lg = dev(lg, M * E * 4), *d_bias = dev(bias, E * 4), *d_pr = gpu->alloc(M * E * 4);
    float *d_gt = gpu->alloc(M * KK * 4);
    int32_t *d_idx = gpu->alloc(sizeof idx);
    cpu->router_forward(pr, idx, gt, lg, bias, M, &rp), gpu->router_forward(d_pr, d_idx, d_gt, d_lg, d_bias, M, &rp);
    gpu->to_host(gidx, d_idx, sizeof gidx);
    CHECK(!memcmp(idx, gidx, sizeof idx), "router_forward %s: the same experts chosen", tag);
    SAME("router_forward scores", pr, d_pr, M * E, 1e-5);
    SAME("router_forward gates", gt, d_gt, M * KK, 1e-5);
    float *dgt = randv(M * KK, 1), *dpr = randv(M * E, 1), *dlg = calloc(M * E, 4);
    float *d_dgt = dev(dgt, M * KK * 4), *d_dpr = dev(dpr, M * E * 4), *d_dlg = gpu->alloc(M * E * 4);
    cpu->router_backward(dlg, dgt, dpr, lg, pr, idx, gt, M, &rp);
    gpu->router_backward(d_dlg, d_dgt, d_dpr, d_lg, d_pr, d_idx, d_gt, M, &rp);
    SAME("router_backward", dlg, d_dlg, M * E, 1e-5);

    /* dispatch with a dropped assignment and two experts that get no tokens */
    for (int i = 0; i < M * KK; i++) idx[i] = idx[i] == 6 || idx[i] == 7 ? 0 : idx[i];
    idx[5] = -1;
    int32_t cnt[E], off[E + 1], slot[M * KK], gcnt[E], goff[E + 1], gslot[M * KK];
    int32_t *d_cnt = gpu->alloc(sizeof cnt), *d_off = gpu->alloc(sizeof off), *d_slot = gpu->alloc(sizeof slot);
    gpu->from_host(d_idx, idx, sizeof idx);
    cpu->moe_dispatch(cnt, off, slot, idx, M, KK, E), gpu->moe_dispatch(d_cnt, d_off, d_slot, d_idx, M, KK, E);
    gpu->to_host(gcnt, d_cnt, sizeof gcnt), gpu->to_host(goff, d_off, sizeof goff), gpu->to_host(gslot, d_slot, sizeof gslot);
    CHECK(!memcmp(cnt, gcnt, sizeof cnt) && !memcmp(off, goff, sizeof off) && !memcmp(slot, gslot, sizeof slot),
          "moe_dispatch %s: identical counts, offsets and slots", tag);
    CHECK(cnt[6] == 0 && cnt[7] == 0, "experts 6 and 7 receive no tokens");
    const int rows = off[E];

    /* permute, grouped GEMMs (empty experts), unpermute */
    float *x = randv(M * C, 1), *xe = calloc(rows * C, 4), *w = randv(E * N * C, 0.3f), *he = calloc(rows * N, 4);
    float *d_x = dev(x, M * C * 4), *d_xe = gpu->alloc(rows * C * 4), *d_w = dev(w, E * N * C * 4);
    float *d_he = gpu->alloc(rows * N * 4);
    cpu->permute_forward(xe, x, slot, M, KK, C), gpu->permute_forward(d_xe, d_x, d_slot, M, KK, C);
    SAME("permute_forward", xe, d_xe, rows * C, 1e-7);
    cpu->grouped_matmul_forward(he, xe, w, off, E, C, N), gpu->grouped_matmul_forward(d_he, d_xe, d_w, d_off, E, C, N);
    SAME("grouped_matmul_forward", he, d_he, rows * N, 1e-4);
    float *dhe = randv(rows * N, 1), *dxe = calloc(rows * C, 4), *dw = randv(E * N * C, 1);
    float *d_dhe = dev(dhe, rows * N * 4), *d_dxe = gpu->alloc(rows * C * 4), *d_dw = dev(dw, E * N * C * 4);
    cpu->grouped_matmul_backward(dxe, dw, dhe, xe, w, off, E, C, N);
    gpu->grouped_matmul_backward(d_dxe, d_dw, d_dhe, d_xe, d_w, d_off, E, C, N);
    SAME("grouped_matmul_backward dinp", dxe, d_dxe, rows * C, 1e-4);
    SAME("grouped_matmul_backward dw (empty experts keep theirs)", dw, d_dw, E * N * C, 1e-4);
    float *dx = calloc(M * C, 4), *d_dx = gpu->alloc(M * C * 4);
    cpu->permute_backward(dx, dxe, slot, M, KK, C), gpu->permute_backward(d_dx, d_dxe, d_slot, M, KK, C);
    SAME("permute_backward", dx, d_dx, M * C, 1e-5);
    float *ye = randv(rows * C, 1), *o = randv(M * C, 1), *dout = randv(M * C, 1), *dye = calloc(rows * C, 4);
    float *dgate = calloc(M * KK, 4);
    float *d_ye = dev(ye, rows * C * 4), *d_o = dev(o, M * C * 4), *d_dout = dev(dout, M * C * 4);
    float *d_dye = gpu->alloc(rows * C * 4), *d_dgate = gpu->alloc(M * KK * 4);
    cpu->unpermute_forward(o, ye, gt, slot, M, KK, C), gpu->unpermute_forward(d_o, d_ye, d_gt, d_slot, M, KK, C);
    SAME("unpermute_forward (accumulates)", o, d_o, M * C, 1e-5);
    cpu->unpermute_backward(dye, dgate, dout, ye, gt, slot, M, KK, C);
    gpu->unpermute_backward(d_dye, d_dgate, d_dout, d_ye, d_gt, d_slot, M, KK, C);
    SAME("unpermute_backward dye", dye, d_dye, rows * C, 1e-5);
    SAME("unpermute_backward dgate", dgate, d_dgate, M * KK, 1e-4);
    free(lg), free(bias), free(pr), free(gt), free(dgt), free(dpr), free(dlg), free(x), free(xe), free(w), free(he);
    free(dhe), free(dxe), free(dw), free(dx), free(ye), free(o), free(dout), free(dye), free(dgate);
}

/* One fp32 training step (forward, backward, AdamW) of a small MoE model on both backends. */
static void test_model_step(void) {
    ml_config cfg;
    config_preset(&cfg, "tiny", NULL);
    config_set(&cfg, "model.experts=8", NULL), config_set(&cfg, "model.top_k=2", NULL);
    const int Bm = 4, Mt = Bm * cfg.model.seq_len;
    int32_t *tok = malloc(sizeof(int32_t) * (Mt + 1));
    for (int i = 0; i <= Mt; i++) tok[i] = (int32_t)(rng_next(&rng) % cfg.model.vocab);
    ml_model *mc = calloc(1, sizeof *mc), *mg = calloc(1, sizeof *mg), *mg2 = calloc(1, sizeof *mg2);
    ml_err err = {0};
    int ok = !model_init(mc, &cfg, cpu, Bm, 0, &err) && !model_init(mg, &cfg, gpu, Bm, 0, &err) &&
             !model_init(mg2, &cfg, gpu, Bm, 0, &err);
    CHECK(ok, "model_init: %s", err.msg);
    if (!ok) return;
    float losses[3];
    ml_model *ms[3] = {mc, mg, mg2};
    for (int i = 0; i < 3; i++) {
        model_init_weights(ms[i], 7);
        model_zero_grad(ms[i]);
        model_begin_step(ms[i], 0);
        losses[i] = model_forward(ms[i], tok, tok + 1);
        model_backward(ms[i], 1.0f);
        double norm = model_grad_norm(ms[i]);
        model_adamw(ms[i], 1e-3f, norm > 1 ? (float)(1 / norm) : 1, 1);
        model_end_step(ms[i]);
    }
    CHECK(fabsf(losses[0] - losses[1]) < 1e-4f * fabsf(losses[0]), "model step: loss cpu %.7f gpu %.7f", losses[0],
          losses[1]);
    float *pc = malloc(sizeof(float) * mc->nparams), *pg = malloc(sizeof(float) * mc->nparams);
    float *pg2 = malloc(sizeof(float) * mc->nparams);
    cpu->to_host(pc, mc->params, sizeof(float) * mc->nparams);
    gpu->to_host(pg, mg->params, sizeof(float) * mc->nparams);
    gpu->to_host(pg2, mg2->params, sizeof(float) * mc->nparams);
    double e = rel_err(pc, pg, mc->nparams);
    CHECK(e < 1e-4, "model step: parameters after one AdamW step, relative error %.3g", e);
    CHECK(!memcmp(pg, pg2, sizeof(float) * mc->nparams) && losses[1] == losses[2],
          "the same seed twice on the GPU: identical parameters and loss");
    free(pc), free(pg), free(pg2), free(tok);
    model_free(mc), model_free(mg), model_free(mg2);
    free(mc), free(mg), free(mg2);
}

int main(void) {
    char why[256];
    if (!cuda_available(why, sizeof why)) {
        printf("SKIP: no usable GPU (%s)\n", why);
        return 77;
    }
    printf("gpu_ops on %s\n", why);
    cpu = backend_cpu(), gpu = backend_cuda();
    rng_seed(&rng, 42);
    test_dense_ops();
    test_attention();
    for (int s = 0; s < 2; s++)
        for (int o = 0; o < 2 - s; o++) /* after-order needs softmax */
            for (int n = 0; n < 2; n++) test_moe(s, o, n);
    test_model_step();
    printf("gpu_ops: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
#endif
