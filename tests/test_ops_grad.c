/* test_ops_grad.c: checks every CPU op's backward against central finite differences in double precision
 * (the _f64 ops), that each backward accumulates, that the float ops agree with the double ones, the router's
 * selection and gate contract, and adamw_update against a hand-computed reference. It does not check the ops'
 * speed or the model as a whole. Prints one line per check and exits 1 on any failure. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "ops_cpu.h"

/* Tolerances.
 * FD: |a - n| / max(1, |a|, |n|) < 1e-6 between the analytic gradient a and the central difference
 *     n = (L(x+h) - L(x-h)) / 2h, h = 1e-6, for L = sum(out * R) with a fixed random R. The difference's
 *     truncation error is O(h^2 f''') ~ 1e-12 and its rounding error ~ 1e-16 |L| / h ~ 1e-9 at these sizes,
 *     while a missing term or a wrong sign shows up as 1e-2 or more.
 * ACC: a second backward call into the same buffers must give 2x the first. Not bit-exact in general: ops that
 *     add several terms into one gradient entry (attention, the encoder with a repeated token, BLAS with
 *     beta = 1) re-associate those sums when the buffer already holds the first result, so 1e-12 relative.
 * F32: the float op against the double op on the same inputs (all inputs are float-representable),
 *     |f - d| / max(1, |d|) < 1e-5.
 * REF: against a formula evaluated here in double: 1e-12. */
#define FD_H 1e-6
#define FD_TOL 1e-6
#define ACC_TOL 1e-12
#define F32_TOL 1e-5
#define REF_TOL 1e-12

static int n_passed, n_failed;

static void report(const char *name, double err, double tol, const char *note) {
    int ok = err < tol; /* false for NaN */
    printf("%-46s max rel err %.2e  %s%s\n", name, err, ok ? "PASS" : "FAIL", note ? note : "");
    if (ok)
        n_passed++;
    else
        n_failed++;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

/* uniform in [lo, hi), rounded to float so that the float and double ops see identical inputs */
static double urand(double lo, double hi) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    double u = (double)(rng_state >> 11) / 9007199254740992.0;
    return (double)(float)(lo + (hi - lo) * u);
}

static void fill(double *x, size_t n, double lo, double hi) {
    for (size_t i = 0; i < n; i++) x[i] = urand(lo, hi);
}

static void to_f32(float *y, const double *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = (float)x[i];
}

static void zero(double *x, size_t n) { memset(x, 0, n * sizeof *x); }

static double dot(const double *a, const double *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static double maxd(double a, double b) { return a > b || isnan(a) ? a : b; }

/* |f - d| / max(1, |d|) over n values */
static double f32_err(const float *f, const double *d, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) worst = maxd(worst, fabs((double)f[i] - d[i]) / fmax(1, fabs(d[i])));
    return worst;
}

/* |twice - 2 once| / max(1, |2 once|) over n values */
static double acc_err(const double *once, const double *twice, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) worst = maxd(worst, fabs(twice[i] - 2 * once[i]) / fmax(1, fabs(2 * once[i])));
    return worst;
}

/* |a - b| / max(1, |a|, |b|) over n values */
static double rel_err(const double *a, const double *b, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++)
        worst = maxd(worst, fabs(a[i] - b[i]) / fmax(1, fmax(fabs(a[i]), fabs(b[i]))));
    return worst;
}

/* A scalar objective of the inputs, recomputed by running the op's forward. same (may be NULL) returns 1 while
 * the op's discrete choices (router top-k) are those of the base point. */
typedef struct {
    double (*loss)(void *ctx);
    int (*same)(void *ctx);
    void *ctx;
} objective;

/* Checks grad (n values) against central differences of o in x, which is perturbed in place and restored.
 * Coordinates whose perturbation changed a discrete choice are skipped and counted. The differences run on one
 * thread: thousands of tiny parallel regions crawl when the machine is oversubscribed (a busy CI runner), and
 * the analytic gradient being checked was computed with all threads, so races in a backward still show. */
static void check_fd(const char *name, const objective *o, double *x, const double *grad, size_t n) {
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    double worst = 0;
    int skipped = 0;
    for (size_t i = 0; i < n; i++) {
        double x0 = x[i];
        x[i] = x0 + FD_H;
        double lp = o->loss(o->ctx);
        int same = !o->same || o->same(o->ctx);
        x[i] = x0 - FD_H;
        double lm = o->loss(o->ctx);
        same = same && (!o->same || o->same(o->ctx));
        x[i] = x0;
        if (!same) {
            skipped++;
            continue;
        }
        double num = (lp - lm) / (2 * FD_H);
        worst = maxd(worst, fabs(grad[i] - num) / fmax(1, fmax(fabs(grad[i]), fabs(num))));
    }
    o->loss(o->ctx); /* leave the scratch outputs at the base point */
    omp_set_num_threads(threads);
    char note[64] = "";
    if (o->same) snprintf(note, sizeof note, "  (%d of %zu coords skipped: selection flipped)", skipped, n);
    report(name, worst, FD_TOL, note);
}

/* ---- encoder ---------------------------------------------------------------------------------------------- */

typedef struct {
    int M, C;
    const int32_t *tokens;
    const double *wte, *R;
    double *out;
} encoder_ctx;

static double encoder_loss(void *p) {
    encoder_ctx *c = p;
    encoder_forward_f64(c->out, c->tokens, c->wte, c->M, c->C);
    return dot(c->out, c->R, (size_t)c->M * c->C);
}

static void test_encoder(void) {
    enum { M = 6, C = 5, V = 4 };
    const int32_t tokens[M] = {1, 3, 1, 0, 3, 3}; /* repeats; token 2 unused */
    double wte[V * C], R[M * C], out[M * C], dwte[V * C], dwte2[V * C];
    fill(wte, V * C, -1, 1);
    fill(R, M * C, -1, 1);
    encoder_ctx c = {M, C, tokens, wte, R, out};
    objective o = {encoder_loss, NULL, &c};

    zero(dwte, V * C);
    encoder_backward_f64(dwte, R, tokens, M, C);
    memcpy(dwte2, dwte, sizeof dwte);
    encoder_backward_f64(dwte2, R, tokens, M, C);
    check_fd("encoder dwte", &o, wte, dwte, V * C);
    report("encoder accumulate (2 calls = 2x)", acc_err(dwte, dwte2, V * C), ACC_TOL, NULL);

    float wte_f[V * C], R_f[M * C], out_f[M * C], dwte_f[V * C] = {0};
    to_f32(wte_f, wte, V * C);
    to_f32(R_f, R, M * C);
    encoder_forward(out_f, tokens, wte_f, M, C);
    encoder_backward(dwte_f, R_f, tokens, M, C);
    report("encoder f32 fwd", f32_err(out_f, out, M * C), F32_TOL, NULL);
    report("encoder f32 bwd", f32_err(dwte_f, dwte, V * C), F32_TOL, NULL);
}

/* ---- matmul ----------------------------------------------------------------------------------------------- */

typedef struct {
    int M, K, N;
    const double *inp, *w, *R;
    double *out;
} matmul_ctx;

static double matmul_loss(void *p) {
    matmul_ctx *c = p;
    matmul_forward_f64(c->out, c->inp, c->w, c->M, c->K, c->N);
    return dot(c->out, c->R, (size_t)c->M * c->N);
}

static void test_matmul(void) {
    enum { M = 5, K = 7, N = 6 };
    double inp[M * K], w[N * K], R[M * N], out[M * N];
    double dinp[M * K], dw[N * K], dinp2[M * K], dw2[N * K], dw_only[N * K];
    fill(inp, M * K, -1, 1);
    fill(w, N * K, -1, 1);
    fill(R, M * N, -1, 1);
    matmul_ctx c = {M, K, N, inp, w, R, out};
    objective o = {matmul_loss, NULL, &c};

    zero(dinp, M * K);
    zero(dw, N * K);
    matmul_backward_f64(dinp, dw, R, inp, w, M, K, N);
    memcpy(dinp2, dinp, sizeof dinp);
    memcpy(dw2, dw, sizeof dw);
    matmul_backward_f64(dinp2, dw2, R, inp, w, M, K, N);
    zero(dw_only, N * K);
    matmul_backward_f64(NULL, dw_only, R, inp, w, M, K, N);

    check_fd("matmul dinp", &o, inp, dinp, M * K);
    check_fd("matmul dw", &o, w, dw, N * K);
    report("matmul accumulate (2 calls = 2x)", maxd(acc_err(dinp, dinp2, M * K), acc_err(dw, dw2, N * K)),
           ACC_TOL, NULL);
    report("matmul dw with dinp = NULL", rel_err(dw, dw_only, N * K), REF_TOL, NULL);

    float inp_f[M * K], w_f[N * K], R_f[M * N], out_f[M * N], dinp_f[M * K] = {0}, dw_f[N * K] = {0};
    to_f32(inp_f, inp, M * K);
    to_f32(w_f, w, N * K);
    to_f32(R_f, R, M * N);
    matmul_forward(out_f, inp_f, w_f, M, K, N);
    matmul_backward(dinp_f, dw_f, R_f, inp_f, w_f, M, K, N);
    report("matmul f32 fwd", f32_err(out_f, out, M * N), F32_TOL, NULL);
    report("matmul f32 bwd", maxd(f32_err(dinp_f, dinp, M * K), f32_err(dw_f, dw, N * K)), F32_TOL, NULL);
}

/* ---- rmsnorm ---------------------------------------------------------------------------------------------- */

typedef struct {
    int M, C;
    float eps;
    const double *inp, *w, *R;
    double *out, *rstd;
} rmsnorm_ctx;

static double rmsnorm_loss(void *p) {
    rmsnorm_ctx *c = p;
    rmsnorm_forward_f64(c->out, c->rstd, c->inp, c->w, c->M, c->C, c->eps);
    return dot(c->out, c->R, (size_t)c->M * c->C);
}

static void test_rmsnorm(void) {
    enum { M = 4, C = 8 };
    const float eps = 1e-5f;
    double inp[M * C], w[C], R[M * C], out[M * C], rstd[M];
    double dinp[M * C], dw[C], dinp2[M * C], dw2[C];
    fill(inp, M * C, -2, 2);
    fill(w, C, 0.5, 1.5);
    fill(R, M * C, -1, 1);
    rmsnorm_ctx c = {M, C, eps, inp, w, R, out, rstd};
    objective o = {rmsnorm_loss, NULL, &c};

    rmsnorm_loss(&c);
    zero(dinp, M * C);
    zero(dw, C);
    rmsnorm_backward_f64(dinp, dw, R, inp, w, rstd, M, C);
    memcpy(dinp2, dinp, sizeof dinp);
    memcpy(dw2, dw, sizeof dw);
    rmsnorm_backward_f64(dinp2, dw2, R, inp, w, rstd, M, C);
    check_fd("rmsnorm dinp", &o, inp, dinp, M * C);
    check_fd("rmsnorm dw", &o, w, dw, C);
    report("rmsnorm accumulate (2 calls = 2x)", maxd(acc_err(dinp, dinp2, M * C), acc_err(dw, dw2, C)), ACC_TOL,
           NULL);

    float inp_f[M * C], w_f[C], R_f[M * C], out_f[M * C], rstd_f[M], dinp_f[M * C] = {0}, dw_f[C] = {0};
    to_f32(inp_f, inp, M * C);
    to_f32(w_f, w, C);
    to_f32(R_f, R, M * C);
    rmsnorm_forward(out_f, rstd_f, inp_f, w_f, M, C, eps);
    rmsnorm_backward(dinp_f, dw_f, R_f, inp_f, w_f, rstd_f, M, C);
    report("rmsnorm f32 fwd", maxd(f32_err(out_f, out, M * C), f32_err(rstd_f, rstd, M)), F32_TOL, NULL);
    report("rmsnorm f32 bwd", maxd(f32_err(dinp_f, dinp, M * C), f32_err(dw_f, dw, C)), F32_TOL, NULL);
}

/* ---- rope ------------------------------------------------------------------------------------------------- */

typedef struct {
    int B, T, nh, hd;
    const double *inp, *cos_t, *sin_t, *R;
    double *out;
} rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *c = p;
    rope_forward_f64(c->out, c->inp, c->cos_t, c->sin_t, c->B, c->T, c->nh, c->hd);
    return dot(c->out, c->R, (size_t)c->B * c->T * c->nh * c->hd);
}

static void test_rope(void) {
    enum { B = 2, T = 5, NH = 3, HD = 8, HALF = HD / 2, N = B * T * NH * HD };
    const float theta = 100.0f; /* small theta: every pair rotates visibly within T = 5 */
    double inp[N], R[N], out[N], cos_t[T * HALF], sin_t[T * HALF], dinp[N], dinp2[N];
    fill(inp, N, -1, 1);
    fill(R, N, -1, 1);
    rope_table_f64(cos_t, sin_t, T, HD, theta);
    rope_ctx c = {B, T, NH, HD, inp, cos_t, sin_t, R, out};
    objective o = {rope_loss, NULL, &c};

    /* the table against its contract: angle t * theta^(-2i/hd) */
    double table_err = 0;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < HALF; i++) {
            double a = t * pow(theta, -2.0 * i / HD);
            table_err = maxd(table_err, fabs(cos_t[t * HALF + i] - cos(a)));
            table_err = maxd(table_err, fabs(sin_t[t * HALF + i] - sin(a)));
        }
    report("rope table vs t*theta^(-2i/hd)", table_err, REF_TOL, NULL);

    zero(dinp, N);
    rope_backward_f64(dinp, R, cos_t, sin_t, B, T, NH, HD);
    memcpy(dinp2, dinp, sizeof dinp);
    rope_backward_f64(dinp2, R, cos_t, sin_t, B, T, NH, HD);
    check_fd("rope dinp", &o, inp, dinp, N);
    report("rope accumulate (2 calls = 2x)", acc_err(dinp, dinp2, N), ACC_TOL, NULL);

    rope_loss(&c);
    float inp_f[N], R_f[N], out_f[N], cos_f[T * HALF], sin_f[T * HALF], dinp_f[N] = {0};
    to_f32(inp_f, inp, N);
    to_f32(R_f, R, N);
    rope_table(cos_f, sin_f, T, HD, theta);
    rope_forward(out_f, inp_f, cos_f, sin_f, B, T, NH, HD);
    rope_backward(dinp_f, R_f, cos_f, sin_f, B, T, NH, HD);
    report("rope f32 fwd", maxd(f32_err(out_f, out, N), maxd(f32_err(cos_f, cos_t, T * HALF),
                                                             f32_err(sin_f, sin_t, T * HALF))),
           F32_TOL, NULL);
    report("rope f32 bwd", f32_err(dinp_f, dinp, N), F32_TOL, NULL);
}

/* ---- attention -------------------------------------------------------------------------------------------- */

typedef struct {
    int B, T, H, KV, hd;
    const double *q, *k, *v, *R;
    double *out, *att;
} attention_ctx;

static double attention_loss(void *p) {
    attention_ctx *c = p;
    attention_forward_f64(c->out, c->att, c->q, c->k, c->v, c->B, c->T, c->H, c->KV, c->hd);
    return dot(c->out, c->R, (size_t)c->B * c->T * c->H * c->hd);
}

static void test_attention(void) {
    enum { B = 2, T = 5, H = 4, KV = 2, HD = 6, NQ = B * T * H * HD, NK = B * T * KV * HD, NA = B * H * T * T };
    double q[NQ], k[NK], v[NK], R[NQ], out[NQ], att[NA];
    double dq[NQ], dk[NK], dv[NK], dq2[NQ], dk2[NK], dv2[NK];
    fill(q, NQ, -1.5, 1.5);
    fill(k, NK, -1.5, 1.5);
    fill(v, NK, -1, 1);
    fill(R, NQ, -1, 1);
    attention_ctx c = {B, T, H, KV, HD, q, k, v, R, out, att};
    objective o = {attention_loss, NULL, &c};

    attention_loss(&c);
    zero(dq, NQ);
    zero(dk, NK);
    zero(dv, NK);
    attention_backward_f64(dq, dk, dv, R, att, q, k, v, B, T, H, KV, HD);
    memcpy(dq2, dq, sizeof dq);
    memcpy(dk2, dk, sizeof dk);
    memcpy(dv2, dv, sizeof dv);
    attention_backward_f64(dq2, dk2, dv2, R, att, q, k, v, B, T, H, KV, HD);
    check_fd("attention dq (GQA H=4 KV=2 T=5)", &o, q, dq, NQ);
    check_fd("attention dk", &o, k, dk, NK);
    check_fd("attention dv", &o, v, dv, NK);
    report("attention accumulate (2 calls = 2x)",
           maxd(acc_err(dq, dq2, NQ), maxd(acc_err(dk, dk2, NK), acc_err(dv, dv2, NK))), ACC_TOL, NULL);

    float q_f[NQ], k_f[NK], v_f[NK], R_f[NQ], out_f[NQ], att_f[NA];
    float dq_f[NQ] = {0}, dk_f[NK] = {0}, dv_f[NK] = {0};
    to_f32(q_f, q, NQ);
    to_f32(k_f, k, NK);
    to_f32(v_f, v, NK);
    to_f32(R_f, R, NQ);
    attention_forward(out_f, att_f, q_f, k_f, v_f, B, T, H, KV, HD);
    attention_backward(dq_f, dk_f, dv_f, R_f, att_f, q_f, k_f, v_f, B, T, H, KV, HD);
    report("attention f32 fwd", maxd(f32_err(out_f, out, NQ), f32_err(att_f, att, NA)), F32_TOL, NULL);
    report("attention f32 bwd",
           maxd(f32_err(dq_f, dq, NQ), maxd(f32_err(dk_f, dk, NK), f32_err(dv_f, dv, NK))), F32_TOL, NULL);
}

/* ---- swiglu ----------------------------------------------------------------------------------------------- */

typedef struct {
    int M, F;
    const double *h, *R;
    double *out;
} swiglu_ctx;

static double swiglu_loss(void *p) {
    swiglu_ctx *c = p;
    swiglu_forward_f64(c->out, c->h, c->M, c->F);
    return dot(c->out, c->R, (size_t)c->M * c->F);
}

static void test_swiglu(void) {
    enum { M = 4, F = 5 };
    double h[M * 2 * F], R[M * F], out[M * F], dh[M * 2 * F], dh2[M * 2 * F];
    fill(h, M * 2 * F, -3, 3);
    fill(R, M * F, -1, 1);
    swiglu_ctx c = {M, F, h, R, out};
    objective o = {swiglu_loss, NULL, &c};

    zero(dh, M * 2 * F);
    swiglu_backward_f64(dh, R, h, M, F);
    memcpy(dh2, dh, sizeof dh);
    swiglu_backward_f64(dh2, R, h, M, F);
    check_fd("swiglu dh", &o, h, dh, M * 2 * F);
    report("swiglu accumulate (2 calls = 2x)", acc_err(dh, dh2, M * 2 * F), ACC_TOL, NULL);

    float h_f[M * 2 * F], R_f[M * F], out_f[M * F], dh_f[M * 2 * F] = {0};
    to_f32(h_f, h, M * 2 * F);
    to_f32(R_f, R, M * F);
    swiglu_forward(out_f, h_f, M, F);
    swiglu_backward(dh_f, R_f, h_f, M, F);
    report("swiglu f32 fwd", f32_err(out_f, out, M * F), F32_TOL, NULL);
    report("swiglu f32 bwd", f32_err(dh_f, dh, M * 2 * F), F32_TOL, NULL);
}

/* ---- add (no backward) ------------------------------------------------------------------------------------ */

static void test_add(void) {
    enum { N = 17 };
    double a[N], b[N], out[N], ref[N];
    fill(a, N, -1, 1);
    fill(b, N, -1, 1);
    for (int i = 0; i < N; i++) ref[i] = a[i] + b[i];
    add_forward_f64(out, a, b, N);
    add_forward_f64(a, a, b, N); /* out aliasing a */
    report("add fwd (and out aliasing a)", maxd(rel_err(out, ref, N), rel_err(a, ref, N)), REF_TOL, NULL);
    float a_f[N], b_f[N], out_f[N];
    for (int i = 0; i < N; i++) a_f[i] = (float)(ref[i] - b[i]);
    to_f32(b_f, b, N);
    add_forward(out_f, a_f, b_f, N);
    report("add f32 fwd", f32_err(out_f, ref, N), F32_TOL, NULL);
}

/* ---- router ----------------------------------------------------------------------------------------------- */

enum { ROUTER_M = 6, ROUTER_E = 8, ROUTER_KMAX = 2 };

typedef struct {
    int M;
    ml_router_params p;
    const double *logits, *Rg, *Rp;
    const float *bias;
    double *probs, *gate;
    int32_t *idx;
    const int32_t *base_idx;
} router_ctx;

static double router_loss(void *ctx) {
    router_ctx *c = ctx;
    router_forward_f64(c->probs, c->idx, c->gate, c->logits, c->bias, c->M, &c->p);
    return dot(c->gate, c->Rg, (size_t)c->M * c->p.k) + dot(c->probs, c->Rp, (size_t)c->M * c->p.E);
}

static int router_same(void *ctx) {
    router_ctx *c = ctx;
    return memcmp(c->idx, c->base_idx, sizeof(int32_t) * c->M * c->p.k) == 0;
}

/* Reference from the contract: scores s, top-k of s + bias (ties to the lower index), and the gate of the
 * picks computed from the unbiased scores (before-order) or the picked logits (after-order). */
static void router_reference(double *s, int32_t *idx, double *gate, const double *logits, const float *bias, int M,
                             const ml_router_params *p) {
    const int E = p->E, K = p->k;
    for (int m = 0; m < M; m++) {
        const double *l = logits + (size_t)m * E;
        double *sm = s + (size_t)m * E;
        if (p->score == SCORE_SIGMOID) {
            for (int e = 0; e < E; e++) sm[e] = 1 / (1 + exp(-l[e]));
        } else {
            double mx = l[0], sum = 0;
            for (int e = 1; e < E; e++) mx = fmax(mx, l[e]);
            for (int e = 0; e < E; e++) sum += exp(l[e] - mx);
            for (int e = 0; e < E; e++) sm[e] = exp(l[e] - mx) / sum;
        }
        int32_t *id = idx + (size_t)m * K;
        int taken[ROUTER_E] = {0};
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                if (taken[e]) continue;
                double key = sm[e] + (bias ? bias[e] : 0);
                double bkey = best < 0 ? 0 : sm[best] + (bias ? bias[best] : 0);
                if (best < 0 || key > bkey) best = e;
            }
            id[j] = best;
            taken[best] = 1;
        }
        double *g = gate + (size_t)m * K, sum = 0;
        if (p->softmax_order == SOFTMAX_AFTER_TOPK) {
            double mx = l[id[0]];
            for (int j = 1; j < K; j++) mx = fmax(mx, l[id[j]]);
            for (int j = 0; j < K; j++) sum += (g[j] = exp(l[id[j]] - mx));
            for (int j = 0; j < K; j++) g[j] = p->route_scale * g[j] / sum;
        } else {
            for (int j = 0; j < K; j++) sum += (g[j] = sm[id[j]]);
            for (int j = 0; j < K; j++) g[j] *= p->norm_topk ? p->route_scale / sum : p->route_scale;
        }
    }
}

static void test_router_config(const char *mode, int score, int order, int norm_topk, int k, int check_accumulate) {
    enum { M = ROUTER_M, E = ROUTER_E, KM = ROUTER_KMAX };
    const ml_router_params p = {.E = E, .k = k, .score = score, .softmax_order = order, .norm_topk = norm_topk,
                                .route_scale = 2.5f};
    double logits[M * E], Rg[M * KM], Rp[M * E], probs[M * E], gate[M * KM];
    double dlogits[M * E], dlogits2[M * E];
    int32_t idx[M * KM], base_idx[M * KM];
    float bias[E];
    fill(logits, M * E, -2, 2);
    fill(Rg, M * k, -1, 1);
    fill(Rp, M * E, -1, 1);
    for (int e = 0; e < E; e++) bias[e] = (float)urand(-0.3, 0.3);
    char name[96];

    /* finite differences, with the bias in (it must not enter the gradient) */
    router_ctx c = {M, p, logits, Rg, Rp, bias, probs, gate, idx, base_idx};
    objective o = {router_loss, router_same, &c};
    router_loss(&c);
    memcpy(base_idx, idx, sizeof(int32_t) * M * k);
    zero(dlogits, M * E);
    router_backward_f64(dlogits, Rg, Rp, logits, probs, idx, gate, M, &p);
    memcpy(dlogits2, dlogits, sizeof dlogits);
    router_backward_f64(dlogits2, Rg, Rp, logits, probs, idx, gate, M, &p);
    snprintf(name, sizeof name, "router %s k=%d dlogits", mode, k);
    check_fd(name, &o, logits, dlogits, M * E);
    if (check_accumulate) report("router accumulate (2 calls = 2x)", acc_err(dlogits, dlogits2, M * E), ACC_TOL, NULL);

    /* the contract, without a bias, with the small random one and with a strong one (+5 on the expert with the
     * lowest logit in row 0, which no key (score or logit) ranks in that row's unbiased top-k): selection =
     * top-k(s + bias), gate from the unbiased score, and the strong bias changes the selection of some row */
    float strong[E];
    int low = 0;
    for (int e = 1; e < E; e++) low = logits[e] < logits[low] ? e : low;
    for (int e = 0; e < E; e++) strong[e] = bias[e] + (e == low ? 5.0f : 0.0f);
    const float *biases[3] = {NULL, bias, strong};
    double s_ref[M * E], gate_ref[M * KM], probs_b[M * E], gate_b[M * KM];
    int32_t idx_ref[M * KM], idx_b[M * KM], idx_nobias[M * KM];
    int sel_bad = 0, changed = 0;
    double val_err = 0;
    for (int b = 0; b < 3; b++) {
        router_forward_f64(probs_b, idx_b, gate_b, logits, biases[b], M, &p);
        router_reference(s_ref, idx_ref, gate_ref, logits, biases[b], M, &p);
        for (int m = 0; m < M; m++) {
            sel_bad += memcmp(idx_b + m * k, idx_ref + m * k, sizeof(int32_t) * k) != 0;
            if (b == 0) memcpy(idx_nobias + m * k, idx_b + m * k, sizeof(int32_t) * k);
            if (b == 2) changed += memcmp(idx_b + m * k, idx_nobias + m * k, sizeof(int32_t) * k) != 0;
            /* the gate of the op's own picks, from the unbiased scores, whichever experts it picked */
            double sum = 0, mx = -INFINITY, g[KM];
            for (int j = 0; j < k; j++) mx = fmax(mx, logits[m * E + idx_b[m * k + j]]);
            for (int j = 0; j < k; j++) {
                int e = idx_b[m * k + j];
                g[j] = order == SOFTMAX_AFTER_TOPK ? exp(logits[m * E + e] - mx) : s_ref[m * E + e];
                sum += g[j];
            }
            for (int j = 0; j < k; j++) {
                double f = order == SOFTMAX_AFTER_TOPK || norm_topk ? p.route_scale / sum : p.route_scale;
                val_err = maxd(val_err, fabs(gate_b[m * k + j] - g[j] * f) / fmax(1, fabs(g[j] * f)));
            }
        }
        val_err = maxd(val_err, rel_err(probs_b, s_ref, M * E));
        if (memcmp(idx_b, idx_ref, sizeof(int32_t) * M * k) == 0) val_err = maxd(val_err, rel_err(gate_b, gate_ref, M * k));
    }
    /* ties go to the lower index: a row of equal logits picks 0..k-1 */
    double tie_logits[E] = {0}, tie_probs[E], tie_gate[KM];
    int32_t tie_idx[KM];
    router_forward_f64(tie_probs, tie_idx, tie_gate, tie_logits, NULL, 1, &p);
    for (int j = 0; j < k; j++) sel_bad += tie_idx[j] != j;
    snprintf(name, sizeof name, "router %s k=%d contract", mode, k);
    char note[112];
    snprintf(note, sizeof note, "  (%d row selections differ from top-k(s+bias); strong bias changed %d of %d rows)",
             sel_bad, changed, M);
    report(name, sel_bad || !changed ? INFINITY : val_err, REF_TOL, note);

    /* float against double, bias in */
    float logits_f[M * E], probs_f[M * E], gate_f[M * KM], Rg_f[M * KM], Rp_f[M * E], dlogits_f[M * E] = {0};
    int32_t idx_f[M * KM];
    to_f32(logits_f, logits, M * E);
    to_f32(Rg_f, Rg, M * k);
    to_f32(Rp_f, Rp, M * E);
    router_forward(probs_f, idx_f, gate_f, logits_f, bias, M, &p);
    router_backward(dlogits_f, Rg_f, Rp_f, logits_f, probs_f, idx_f, gate_f, M, &p);
    int idx_bad = memcmp(idx_f, idx, sizeof(int32_t) * M * k) != 0;
    snprintf(name, sizeof name, "router %s k=%d f32 fwd", mode, k);
    report(name, idx_bad ? INFINITY : maxd(f32_err(probs_f, probs, M * E), f32_err(gate_f, gate, M * k)), F32_TOL,
           idx_bad ? "  (float selection differs)" : NULL);
    snprintf(name, sizeof name, "router %s k=%d f32 bwd", mode, k);
    report(name, f32_err(dlogits_f, dlogits, M * E), F32_TOL, NULL);
}

static void test_router(void) {
    for (int k = 1; k <= ROUTER_KMAX; k++) {
        test_router_config("softmax/before", SCORE_SOFTMAX, SOFTMAX_BEFORE_TOPK, 0, k, k == 2);
        test_router_config("softmax/before/norm", SCORE_SOFTMAX, SOFTMAX_BEFORE_TOPK, 1, k, 0);
        test_router_config("sigmoid/before/norm", SCORE_SIGMOID, SOFTMAX_BEFORE_TOPK, 1, k, 0);
        test_router_config("softmax/after", SCORE_SOFTMAX, SOFTMAX_AFTER_TOPK, 0, k, 0);
    }
}

/* ---- permute / unpermute ---------------------------------------------------------------------------------- */

enum { PERM_M = 5, PERM_K = 2, PERM_C = 4, PERM_ROWS = PERM_M * PERM_K - 1 };
/* a shuffled assignment of the 9 expert rows, one (token, choice) dropped */
static const int32_t perm_slot[PERM_M * PERM_K] = {3, 7, 0, -1, 8, 1, 5, 2, 6, 4};

typedef struct {
    const double *inp, *R;
    double *xe;
} permute_ctx;

static double permute_loss(void *p) {
    permute_ctx *c = p;
    permute_forward_f64(c->xe, c->inp, perm_slot, PERM_M, PERM_K, PERM_C);
    return dot(c->xe, c->R, PERM_ROWS * PERM_C);
}

typedef struct {
    const double *ye, *gate, *R;
    double *out;
} unpermute_ctx;

static double unpermute_loss(void *p) {
    unpermute_ctx *c = p;
    zero(c->out, PERM_M * PERM_C); /* the forward accumulates */
    unpermute_forward_f64(c->out, c->ye, c->gate, perm_slot, PERM_M, PERM_K, PERM_C);
    return dot(c->out, c->R, PERM_M * PERM_C);
}

static void test_permute(void) {
    enum { M = PERM_M, K = PERM_K, C = PERM_C, ROWS = PERM_ROWS };
    double inp[M * C], Rx[ROWS * C], xe[ROWS * C], dinp[M * C], dinp2[M * C];
    fill(inp, M * C, -1, 1);
    fill(Rx, ROWS * C, -1, 1);
    permute_ctx pc = {inp, Rx, xe};
    objective po = {permute_loss, NULL, &pc};
    zero(dinp, M * C);
    permute_backward_f64(dinp, Rx, perm_slot, M, K, C);
    memcpy(dinp2, dinp, sizeof dinp);
    permute_backward_f64(dinp2, Rx, perm_slot, M, K, C);
    check_fd("permute dinp (one slot dropped)", &po, inp, dinp, M * C);
    report("permute accumulate (2 calls = 2x)", acc_err(dinp, dinp2, M * C), ACC_TOL, NULL);

    double ye[ROWS * C], gate[M * K], Ro[M * C], out[M * C], dye[ROWS * C], dgate[M * K], dye2[ROWS * C],
        dgate2[M * K], out2[M * C];
    fill(ye, ROWS * C, -1, 1);
    fill(gate, M * K, 0, 1);
    fill(Ro, M * C, -1, 1);
    unpermute_ctx uc = {ye, gate, Ro, out};
    objective uo = {unpermute_loss, NULL, &uc};
    zero(dye, ROWS * C);
    zero(dgate, M * K);
    unpermute_backward_f64(dye, dgate, Ro, ye, gate, perm_slot, M, K, C);
    memcpy(dye2, dye, sizeof dye);
    memcpy(dgate2, dgate, sizeof dgate);
    unpermute_backward_f64(dye2, dgate2, Ro, ye, gate, perm_slot, M, K, C);
    check_fd("unpermute dye", &uo, ye, dye, ROWS * C);
    check_fd("unpermute dgate", &uo, gate, dgate, M * K);
    /* the forward accumulates too (out +=): twice into a zeroed buffer is 2x */
    memcpy(out2, out, sizeof out);
    unpermute_forward_f64(out2, ye, gate, perm_slot, M, K, C);
    report("unpermute accumulate (bwd 2x, fwd 2x)",
           maxd(maxd(acc_err(dye, dye2, ROWS * C), acc_err(dgate, dgate2, M * K)), acc_err(out, out2, M * C)),
           ACC_TOL, NULL);

    float inp_f[M * C], Rx_f[ROWS * C], xe_f[ROWS * C], dinp_f[M * C] = {0};
    to_f32(inp_f, inp, M * C);
    to_f32(Rx_f, Rx, ROWS * C);
    permute_forward(xe_f, inp_f, perm_slot, M, K, C);
    permute_backward(dinp_f, Rx_f, perm_slot, M, K, C);
    float ye_f[ROWS * C], gate_f[M * K], Ro_f[M * C], out_f[M * C] = {0}, dye_f[ROWS * C] = {0},
                                                          dgate_f[M * K] = {0};
    to_f32(ye_f, ye, ROWS * C);
    to_f32(gate_f, gate, M * K);
    to_f32(Ro_f, Ro, M * C);
    unpermute_forward(out_f, ye_f, gate_f, perm_slot, M, K, C);
    unpermute_backward(dye_f, dgate_f, Ro_f, ye_f, gate_f, perm_slot, M, K, C);
    report("permute/unpermute f32 fwd", maxd(f32_err(xe_f, xe, ROWS * C), f32_err(out_f, out, M * C)), F32_TOL,
           NULL);
    report("permute/unpermute f32 bwd",
           maxd(f32_err(dinp_f, dinp, M * C), maxd(f32_err(dye_f, dye, ROWS * C), f32_err(dgate_f, dgate, M * K))),
           F32_TOL, NULL);
}

/* ---- grouped matmul --------------------------------------------------------------------------------------- */

enum { GM_E = 4, GM_K = 5, GM_N = 3, GM_ROWS = 7 };
/* experts 0 and 2 get no rows */
static const int32_t gm_offsets[GM_E + 1] = {0, 0, 3, 3, 7};

typedef struct {
    const double *inp, *w, *R;
    double *out;
} gmm_ctx;

static double gmm_loss(void *p) {
    gmm_ctx *c = p;
    grouped_matmul_forward_f64(c->out, c->inp, c->w, gm_offsets, GM_E, GM_K, GM_N);
    return dot(c->out, c->R, GM_ROWS * GM_N);
}

static void test_grouped_matmul(void) {
    enum { E = GM_E, K = GM_K, N = GM_N, ROWS = GM_ROWS, NW = E * N * K };
    double inp[ROWS * K], w[NW], R[ROWS * N], out[ROWS * N];
    double dinp[ROWS * K], dw[NW], dinp2[ROWS * K], dw2[NW], dw_seed[NW], dw_seeded[NW], dw_only[NW];
    fill(inp, ROWS * K, -1, 1);
    fill(w, NW, -1, 1);
    fill(R, ROWS * N, -1, 1);
    gmm_ctx c = {inp, w, R, out};
    objective o = {gmm_loss, NULL, &c};

    zero(dinp, ROWS * K);
    zero(dw, NW);
    grouped_matmul_backward_f64(dinp, dw, R, inp, w, gm_offsets, E, K, N);
    memcpy(dinp2, dinp, sizeof dinp);
    memcpy(dw2, dw, sizeof dw);
    grouped_matmul_backward_f64(dinp2, dw2, R, inp, w, gm_offsets, E, K, N);
    check_fd("grouped_matmul dinp (experts 0, 2 empty)", &o, inp, dinp, ROWS * K);
    check_fd("grouped_matmul dw", &o, w, dw, NW);
    report("grouped_matmul accumulate (2 calls = 2x)",
           maxd(acc_err(dinp, dinp2, ROWS * K), acc_err(dw, dw2, NW)), ACC_TOL, NULL);

    /* an empty expert's dw must keep its previous contents bit for bit (not be zeroed or scaled) */
    fill(dw_seed, NW, -1, 1);
    memcpy(dw_seeded, dw_seed, sizeof dw_seed);
    zero(dinp2, ROWS * K);
    grouped_matmul_backward_f64(dinp2, dw_seeded, R, inp, w, gm_offsets, E, K, N);
    int changed = 0;
    for (int e = 0; e < E; e++) {
        if (gm_offsets[e + 1] > gm_offsets[e]) continue;
        changed += memcmp(dw_seeded + e * N * K, dw_seed + e * N * K, sizeof(double) * N * K) != 0;
    }
    char note[64];
    snprintf(note, sizeof note, "  (%d empty experts' dw changed)", changed);
    report("grouped_matmul empty expert dw unchanged", changed ? INFINITY : 0, REF_TOL, note);
    zero(dw_only, NW);
    grouped_matmul_backward_f64(NULL, dw_only, R, inp, w, gm_offsets, E, K, N);
    report("grouped_matmul dw with dinp = NULL", rel_err(dw, dw_only, NW), REF_TOL, NULL);

    float inp_f[ROWS * K], w_f[NW], R_f[ROWS * N], out_f[ROWS * N], dinp_f[ROWS * K] = {0}, dw_f[NW] = {0};
    to_f32(inp_f, inp, ROWS * K);
    to_f32(w_f, w, NW);
    to_f32(R_f, R, ROWS * N);
    grouped_matmul_forward(out_f, inp_f, w_f, gm_offsets, E, K, N);
    grouped_matmul_backward(dinp_f, dw_f, R_f, inp_f, w_f, gm_offsets, E, K, N);
    report("grouped_matmul f32 fwd", f32_err(out_f, out, ROWS * N), F32_TOL, NULL);
    report("grouped_matmul f32 bwd", maxd(f32_err(dinp_f, dinp, ROWS * K), f32_err(dw_f, dw, NW)), F32_TOL, NULL);
}

/* ---- cross-entropy ---------------------------------------------------------------------------------------- */

enum { CE_M = 4, CE_V = 7 };
static const int32_t ce_targets[CE_M] = {2, 0, 6, 3};

typedef struct {
    const double *logits, *R;
    double *losses;
} ce_ctx;

static double ce_loss(void *p) {
    ce_ctx *c = p;
    crossentropy_forward_f64(c->losses, c->logits, ce_targets, CE_M, CE_V);
    return dot(c->losses, c->R, CE_M);
}

static void test_crossentropy(void) {
    enum { M = CE_M, V = CE_V };
    double logits[M * V], R[M], Ru[M], losses[M], dl[M * V], dl2[M * V], dlu[M * V];
    fill(logits, M * V, -3, 3);
    fill(R, M, 0.5, 1.5);
    const float uniform = 0.75f; /* e.g. 1 / (B T) */
    for (int m = 0; m < M; m++) Ru[m] = uniform;

    /* the scale is one number per call: per-row weights R[m] take one call per row */
    ce_ctx c = {logits, R, losses};
    objective o = {ce_loss, NULL, &c};
    zero(dl, M * V);
    for (int m = 0; m < M; m++)
        crossentropy_backward_f64(dl + m * V, logits + m * V, ce_targets + m, (float)R[m], 1, V);
    memcpy(dl2, dl, sizeof dl);
    for (int m = 0; m < M; m++)
        crossentropy_backward_f64(dl2 + m * V, logits + m * V, ce_targets + m, (float)R[m], 1, V);
    check_fd("crossentropy dlogits (per-row scale)", &o, logits, dl, M * V);
    report("crossentropy accumulate (2 calls = 2x)", acc_err(dl, dl2, M * V), ACC_TOL, NULL);

    ce_ctx cu = {logits, Ru, losses};
    objective ou = {ce_loss, NULL, &cu};
    zero(dlu, M * V);
    crossentropy_backward_f64(dlu, logits, ce_targets, uniform, M, V);
    check_fd("crossentropy dlogits (one call, scale 0.75)", &ou, logits, dlu, M * V);

    /* the forward against its contract: logsumexp - target logit */
    double ref[M];
    for (int m = 0; m < M; m++) {
        double s = 0;
        for (int i = 0; i < V; i++) s += exp(logits[m * V + i]);
        ref[m] = log(s) - logits[m * V + ce_targets[m]];
    }
    ce_loss(&c);
    report("crossentropy fwd vs logsumexp - target", rel_err(losses, ref, M), REF_TOL, NULL);

    float logits_f[M * V], losses_f[M], dl_f[M * V] = {0};
    to_f32(logits_f, logits, M * V);
    crossentropy_forward(losses_f, logits_f, ce_targets, M, V);
    crossentropy_backward(dl_f, logits_f, ce_targets, uniform, M, V);
    report("crossentropy f32 fwd", f32_err(losses_f, losses, M), F32_TOL, NULL);
    report("crossentropy f32 bwd", f32_err(dl_f, dlu, M * V), F32_TOL, NULL);
}

/* ---- AdamW ------------------------------------------------------------------------------------------------ */

static void test_adamw(void) {
    enum { N = 6, STEPS = 2 };
    const float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, grad_scale = 0.5f;
    double param[N], grad[STEPS][N], m[N] = {0}, v[N] = {0};
    double ref_p[N], ref_m[N] = {0}, ref_v[N] = {0};
    fill(param, N, -1, 1);
    fill(&grad[0][0], STEPS * N, -2, 2);
    grad[1][3] = 0; /* a zero gradient: only the momentum and the decay move the value */
    memcpy(ref_p, param, sizeof param);
    float param_f[N], m_f[N] = {0}, v_f[N] = {0}, grad_f[N];
    to_f32(param_f, param, N);

    double worst = 0;
    for (int t = 1; t <= STEPS; t++) {
        /* Loshchilov & Hutter, decoupled weight decay scaled by lr (as torch.optim.AdamW), with bias correction */
        const double b1 = beta1, b2 = beta2;
        for (int i = 0; i < N; i++) {
            double g = grad[t - 1][i] * (double)grad_scale;
            ref_m[i] = b1 * ref_m[i] + (1 - b1) * g;
            ref_v[i] = b2 * ref_v[i] + (1 - b2) * g * g;
            double mh = ref_m[i] / (1 - pow(b1, t)), vh = ref_v[i] / (1 - pow(b2, t));
            ref_p[i] -= (double)lr * (mh / (sqrt(vh) + (double)eps) + (double)wd * ref_p[i]);
        }
        adamw_update_f64(param, grad[t - 1], m, v, N, lr, beta1, beta2, eps, wd, grad_scale, t);
        to_f32(grad_f, grad[t - 1], N);
        adamw_update(param_f, grad_f, m_f, v_f, N, lr, beta1, beta2, eps, wd, grad_scale, t);
        worst = maxd(worst, maxd(rel_err(param, ref_p, N), maxd(rel_err(m, ref_m, N), rel_err(v, ref_v, N))));
    }
    report("adamw 2 steps vs hand reference (p, m, v)", worst, REF_TOL, NULL);
    report("adamw f32 (p, m, v after 2 steps)",
           maxd(f32_err(param_f, param, N), maxd(f32_err(m_f, m, N), f32_err(v_f, v, N))), F32_TOL, NULL);
}

/* ---- sumsq ------------------------------------------------------------------------------------------------ */

static void test_sumsq(void) {
    enum { N = 33 };
    double x[N], ref = 0;
    float x_f[N];
    fill(x, N, -2, 2);
    to_f32(x_f, x, N);
    for (int i = 0; i < N; i++) ref += x[i] * x[i];
    double s = sumsq_f64(x, N), s_f = sumsq(x_f, N);
    report("sumsq vs hand", fabs(s - ref) / fmax(1, ref), REF_TOL, NULL);
    report("sumsq f32", fabs(s_f - s) / fmax(1, s), F32_TOL, NULL);
}

int main(void) {
    test_encoder();
    test_matmul();
    test_rmsnorm();
    test_rope();
    test_attention();
    test_swiglu();
    test_add();
    test_router();
    test_permute();
    test_grouped_matmul();
    test_crossentropy();
    test_adamw();
    test_sumsq();
    printf("ops_grad: %d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
