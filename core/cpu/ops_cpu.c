/* ops_cpu.c: the CPU reference implementation of every op of the model, forward and backward, with
 * OpenBLAS for the GEMMs and OpenMP across rows, heads and experts. Compiled twice: as float (the backend)
 * and, from ops_cpu_f64.c, as double for the finite-difference tests. No allocation happens here. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "config.h"
#include "ops_cpu.h"

#ifdef OPS_DOUBLE
typedef double real;
#define N_(n) n##_f64
#define GEMM cblas_dgemm
#define EXP exp
#define SQRT sqrt
#define COS cos
#define SIN sin
#else
typedef float real;
#define N_(n) n
#define GEMM cblas_sgemm
#define EXP expf_poly

/* expf for hot loops: Cephes' range reduction and degree-6 polynomial (about 1 ulp on [-87, 88]). Unlike a
 * libm call, GCC vectorises it inside `omp simd` loops (the cross-entropy over the vocabulary dominates). */
static inline float expf_poly(float x) {
    x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x; /* not fminf/fmaxf: those stay libm calls */
    /* round to nearest by the 1.5 * 2^23 trick (plain adds, so it vectorises; no -ffast-math here) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
#define SQRT sqrtf
#define COS cosf
#define SIN sinf
#endif

void N_(encoder_forward)(real *out, const int32_t *tokens, const real *wte, int M, int C) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) memcpy(out + (size_t)m * C, wte + (size_t)tokens[m] * C, sizeof(real) * C);
}

void N_(encoder_backward)(real *dwte, const real *dout, const int32_t *tokens, int M, int C) {
    /* serial: two rows may share a token id */
    for (int m = 0; m < M; m++) {
        real *d = dwte + (size_t)tokens[m] * C;
        const real *g = dout + (size_t)m * C;
        for (int c = 0; c < C; c++) d[c] += g[c];
    }
}

void N_(matmul_forward)(real *out, const real *inp, const real *w, int M, int K, int N) {
    if (M == 0) return;
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1, inp, K, w, K, 0, out, N);
}

void N_(matmul_backward)(real *dinp, real *dw, const real *dout, const real *inp, const real *w, int M, int K,
                         int N) {
    if (M == 0) return;
    if (dinp) GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, K, N, 1, dout, N, w, K, 1, dinp, K);
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, N, K, M, 1, dout, N, inp, K, 1, dw, K);
}

void N_(rmsnorm_forward)(real *out, real *rstd, const real *inp, const real *w, int M, int C, float eps) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *x = inp + (size_t)m * C;
        real *o = out + (size_t)m * C;
        double ss = 0;
        for (int c = 0; c < C; c++) ss += (double)x[c] * x[c];
        real r = (real)(1.0 / sqrt(ss / C + eps));
        rstd[m] = r;
        for (int c = 0; c < C; c++) o[c] = x[c] * r * w[c];
    }
}

void N_(rmsnorm_backward)(real *dinp, real *dw, const real *dout, const real *inp, const real *w, const real *rstd,
                          int M, int C) {
    /* y = x r w, r = (mean x^2 + eps)^-1/2:  dx = r (g w) - x r^3 mean(g w x) */
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *x = inp + (size_t)m * C, *g = dout + (size_t)m * C;
        real *dx = dinp + (size_t)m * C;
        real r = rstd[m];
        double dot = 0;
        for (int c = 0; c < C; c++) dot += (double)g[c] * w[c] * x[c];
        real coef = (real)(dot / C) * r * r * r;
        for (int c = 0; c < C; c++) dx[c] += r * g[c] * w[c] - coef * x[c];
    }
    /* dw reduction over rows: split columns across threads so no two threads write the same dw[c] */
#pragma omp parallel for
    for (int c = 0; c < C; c++) {
        double acc = 0;
        for (int m = 0; m < M; m++) acc += (double)dout[(size_t)m * C + c] * inp[(size_t)m * C + c] * rstd[m];
        dw[c] += (real)acc;
    }
}

void N_(rope_table)(real *cos_t, real *sin_t, int T, int hd, float theta) {
    int half = hd / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            double freq = pow((double)theta, -2.0 * i / hd);
            cos_t[t * half + i] = (real)cos(t * freq);
            sin_t[t * half + i] = (real)sin(t * freq);
        }
}

void N_(rope_forward)(real *out, const real *inp, const real *cos_t, const real *sin_t, int B, int T, int nh,
                      int hd) {
    int half = hd / 2;
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < nh; h++) {
                const real *x = inp + (((size_t)b * T + t) * nh + h) * hd;
                real *o = out + (((size_t)b * T + t) * nh + h) * hd;
                const real *cs = cos_t + (size_t)t * half, *sn = sin_t + (size_t)t * half;
                for (int i = 0; i < half; i++) {
                    real x1 = x[i], x2 = x[i + half];
                    o[i] = x1 * cs[i] - x2 * sn[i];
                    o[i + half] = x2 * cs[i] + x1 * sn[i];
                }
            }
}

void N_(rope_backward)(real *dinp, const real *dout, const real *cos_t, const real *sin_t, int B, int T, int nh,
                       int hd) {
    int half = hd / 2;
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < nh; h++) {
                const real *g = dout + (((size_t)b * T + t) * nh + h) * hd;
                real *d = dinp + (((size_t)b * T + t) * nh + h) * hd;
                const real *cs = cos_t + (size_t)t * half, *sn = sin_t + (size_t)t * half;
                for (int i = 0; i < half; i++) {
                    real g1 = g[i], g2 = g[i + half];
                    d[i] += g1 * cs[i] + g2 * sn[i];
                    d[i + half] += g2 * cs[i] - g1 * sn[i];
                }
            }
}

void N_(attention_forward)(real *out, real *att, const real *q, const real *k, const real *v, int B, int T, int H,
                           int KV, int hd) {
    const real scale = (real)(1.0 / sqrt((double)hd));
    const int group = H / KV;
#pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const int kh = h / group;
                const real *qt = q + (((size_t)b * T + t) * H + h) * hd;
                real *a = att + (((size_t)b * H + h) * T + t) * T;
                real mx = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    const real *ks = k + (((size_t)b * T + s) * KV + kh) * hd;
                    real dot = 0;
                    for (int i = 0; i < hd; i++) dot += qt[i] * ks[i];
                    a[s] = dot * scale;
                    if (a[s] > mx) mx = a[s];
                }
                real sum = 0;
                for (int s = 0; s <= t; s++) {
                    a[s] = EXP(a[s] - mx);
                    sum += a[s];
                }
                real inv = 1 / sum;
                for (int s = 0; s <= t; s++) a[s] *= inv;
                for (int s = t + 1; s < T; s++) a[s] = 0;
                real *o = out + (((size_t)b * T + t) * H + h) * hd;
                for (int i = 0; i < hd; i++) o[i] = 0;
                for (int s = 0; s <= t; s++) {
                    const real *vs = v + (((size_t)b * T + s) * KV + kh) * hd;
                    real w = a[s];
                    for (int i = 0; i < hd; i++) o[i] += w * vs[i];
                }
            }
}

void N_(attention_backward)(real *dq, real *dk, real *dv, const real *dout, const real *att, const real *q,
                            const real *k, const real *v, int B, int T, int H, int KV, int hd) {
    const real scale = (real)(1.0 / sqrt((double)hd));
    const int group = H / KV;
    /* one thread owns a (batch, kv head) pair: the query heads of its group all write that kv head's dk, dv */
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int kh = 0; kh < KV; kh++) {
            real dp[T > 0 ? T : 1];
            for (int h = kh * group; h < (kh + 1) * group; h++)
                for (int t = 0; t < T; t++) {
                    const real *a = att + (((size_t)b * H + h) * T + t) * T;
                    const real *go = dout + (((size_t)b * T + t) * H + h) * hd;
                    const real *qt = q + (((size_t)b * T + t) * H + h) * hd;
                    real *dqt = dq + (((size_t)b * T + t) * H + h) * hd;
                    real sum = 0;
                    for (int s = 0; s <= t; s++) {
                        const real *vs = v + (((size_t)b * T + s) * KV + kh) * hd;
                        real *dvs = dv + (((size_t)b * T + s) * KV + kh) * hd;
                        real d = 0;
                        for (int i = 0; i < hd; i++) {
                            d += go[i] * vs[i];
                            dvs[i] += a[s] * go[i];
                        }
                        dp[s] = d;
                        sum += a[s] * d;
                    }
                    for (int s = 0; s <= t; s++) {
                        real ds = a[s] * (dp[s] - sum) * scale;
                        const real *ks = k + (((size_t)b * T + s) * KV + kh) * hd;
                        real *dks = dk + (((size_t)b * T + s) * KV + kh) * hd;
                        for (int i = 0; i < hd; i++) {
                            dqt[i] += ds * ks[i];
                            dks[i] += ds * qt[i];
                        }
                    }
                }
        }
}

void N_(swiglu_forward)(real *out, const real *h, int M, int F) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *g = h + (size_t)m * 2 * F, *u = g + F;
        real *o = out + (size_t)m * F;
        for (int i = 0; i < F; i++) o[i] = g[i] / (1 + EXP(-g[i])) * u[i];
    }
}

void N_(swiglu_backward)(real *dh, const real *dout, const real *h, int M, int F) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *g = h + (size_t)m * 2 * F, *u = g + F, *d = dout + (size_t)m * F;
        real *dg = dh + (size_t)m * 2 * F, *du = dg + F;
        for (int i = 0; i < F; i++) {
            real sig = 1 / (1 + EXP(-g[i]));
            real silu = g[i] * sig;
            du[i] += d[i] * silu;
            dg[i] += d[i] * u[i] * sig * (1 + g[i] * (1 - sig));
        }
    }
}

void N_(add_forward)(real *out, const real *a, const real *b, size_t n) {
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void N_(router_forward)(real *probs, int32_t *idx, real *gate, const real *logits, const float *bias, int M,
                        const ml_router_params *p) {
    const int E = p->E, K = p->k;
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *l = logits + (size_t)m * E;
        real *s = probs + (size_t)m * E;
        if (p->score == SCORE_SIGMOID) {
            for (int e = 0; e < E; e++) s[e] = 1 / (1 + EXP(-l[e]));
        } else {
            real mx = l[0];
            for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
            real sum = 0;
            for (int e = 0; e < E; e++) sum += (s[e] = EXP(l[e] - mx));
            for (int e = 0; e < E; e++) s[e] /= sum;
        }
        /* selection key: the score plus the bias, in every mode (arXiv 2408.15664 adds b_i to s_i) */
        const real *key = s;
        int32_t *id = idx + (size_t)m * K;
        for (int j = 0; j < K && !p->given_idx; j++) {
            int best = -1;
            real bv = 0;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= id[i] == e;
                if (taken) continue;
                real kv = key[e] + (bias ? (real)bias[e] : 0);
                if (best < 0 || kv > bv) best = e, bv = kv;
            }
            id[j] = best;
        }
        real *g = gate + (size_t)m * K;
        if (p->softmax_order == SOFTMAX_AFTER_TOPK) {
            real mx = l[id[0]];
            for (int j = 1; j < K; j++) mx = l[id[j]] > mx ? l[id[j]] : mx;
            real sum = 0;
            for (int j = 0; j < K; j++) sum += (g[j] = EXP(l[id[j]] - mx));
            for (int j = 0; j < K; j++) g[j] = g[j] / sum * p->route_scale;
        } else {
            real sum = 0;
            for (int j = 0; j < K; j++) sum += (g[j] = s[id[j]]);
            real f = p->norm_topk ? p->route_scale / sum : p->route_scale;
            for (int j = 0; j < K; j++) g[j] *= f;
        }
    }
}

void N_(router_backward)(real *dlogits, const real *dgate, const real *dprobs, const real *logits, const real *probs,
                         const int32_t *idx, const real *gate, int M, const ml_router_params *p) {
    const int E = p->E, K = p->k;
    (void)logits;
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *s = probs + (size_t)m * E, *g = gate + (size_t)m * K, *dg = dgate + (size_t)m * K;
        const int32_t *id = idx + (size_t)m * K;
        real *dl = dlogits + (size_t)m * E;
        real ds[E]; /* gradient w.r.t. the scores s */
        for (int e = 0; e < E; e++) ds[e] = dprobs ? dprobs[(size_t)m * E + e] : 0;
        if (p->softmax_order == SOFTMAX_AFTER_TOPK) {
            /* g = rs * softmax(l[id]): dl[id_j] = g_j (dg_j - sum_i g_i dg_i / rs) */
            real dot = 0;
            for (int j = 0; j < K; j++) dot += g[j] * dg[j];
            dot /= p->route_scale;
            for (int j = 0; j < K; j++) dl[id[j]] += g[j] * (dg[j] - dot);
        } else if (p->norm_topk) {
            /* g_j = rs * s_j / S, S = sum of picked s: ds_j = (rs dg_j - sum_i g_i dg_i) / S */
            real S = 0, dot = 0;
            for (int j = 0; j < K; j++) S += s[id[j]], dot += g[j] * dg[j];
            for (int j = 0; j < K; j++) ds[id[j]] += (p->route_scale * dg[j] - dot) / S;
        } else {
            for (int j = 0; j < K; j++) ds[id[j]] += p->route_scale * dg[j];
        }
        if (p->score == SCORE_SIGMOID) {
            for (int e = 0; e < E; e++) dl[e] += ds[e] * s[e] * (1 - s[e]);
        } else {
            real dot = 0;
            for (int e = 0; e < E; e++) dot += s[e] * ds[e];
            for (int e = 0; e < E; e++) dl[e] += s[e] * (ds[e] - dot);
        }
    }
}

void N_(permute_forward)(real *xe, const real *inp, const int32_t *slot, int M, int k, int C) {
#pragma omp parallel for
    for (int m = 0; m < M; m++)
        for (int j = 0; j < k; j++) {
            int r = slot[(size_t)m * k + j];
            if (r >= 0) memcpy(xe + (size_t)r * C, inp + (size_t)m * C, sizeof(real) * C);
        }
}

void N_(permute_backward)(real *dinp, const real *dxe, const int32_t *slot, int M, int k, int C) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        real *d = dinp + (size_t)m * C;
        for (int j = 0; j < k; j++) {
            int r = slot[(size_t)m * k + j];
            if (r < 0) continue;
            const real *g = dxe + (size_t)r * C;
            for (int c = 0; c < C; c++) d[c] += g[c];
        }
    }
}

void N_(unpermute_forward)(real *out, const real *ye, const real *gate, const int32_t *slot, int M, int k, int C) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        real *o = out + (size_t)m * C;
        for (int j = 0; j < k; j++) {
            int r = slot[(size_t)m * k + j];
            if (r < 0) continue;
            const real *y = ye + (size_t)r * C;
            real g = gate[(size_t)m * k + j];
            for (int c = 0; c < C; c++) o[c] += g * y[c];
        }
    }
}

void N_(unpermute_backward)(real *dye, real *dgate, const real *dout, const real *ye, const real *gate,
                            const int32_t *slot, int M, int k, int C) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *d = dout + (size_t)m * C;
        for (int j = 0; j < k; j++) {
            int r = slot[(size_t)m * k + j];
            if (r < 0) continue;
            const real *y = ye + (size_t)r * C;
            real *dy = dye + (size_t)r * C;
            real g = gate[(size_t)m * k + j], dot = 0;
            for (int c = 0; c < C; c++) {
                dot += d[c] * y[c];
                dy[c] += g * d[c];
            }
            dgate[(size_t)m * k + j] += dot;
        }
    }
}

void N_(grouped_matmul_forward)(real *out, const real *inp, const real *w, const int32_t *offsets, int E, int K,
                                int N) {
    /* experts run in parallel, each GEMM single-threaded (the OpenMP OpenBLAS does not nest) */
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E; e++) {
        int n = offsets[e + 1] - offsets[e];
        if (n == 0) continue;
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, N, K, 1, inp + (size_t)offsets[e] * K, K,
             w + (size_t)e * N * K, K, 0, out + (size_t)offsets[e] * N, N);
    }
}

void N_(grouped_matmul_backward)(real *dinp, real *dw, const real *dout, const real *inp, const real *w,
                                 const int32_t *offsets, int E, int K, int N) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E; e++) {
        int n = offsets[e + 1] - offsets[e];
        if (n == 0) continue;
        const real *go = dout + (size_t)offsets[e] * N, *x = inp + (size_t)offsets[e] * K;
        const real *we = w + (size_t)e * N * K;
        if (dinp) GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, K, N, 1, go, N, we, K, 1,
                       dinp + (size_t)offsets[e] * K, K);
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, N, K, n, 1, go, N, x, K, 1, dw + (size_t)e * N * K, K);
    }
}

void N_(crossentropy_forward)(real *losses, const real *logits, const int32_t *targets, int M, int V) {
#pragma omp parallel for
    for (int m = 0; m < M; m++) {
        const real *l = logits + (size_t)m * V;
        real mx = l[0];
        for (int i = 1; i < V; i++) mx = l[i] > mx ? l[i] : mx;
        double sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < V; i++) sum += EXP(l[i] - mx);
        losses[m] = (real)(log(sum) + mx - l[targets[m]]);
    }
}

void N_(crossentropy_backward)(real *dlogits, const real *logits, const int32_t *targets, float scale, int M, int V) {
#pragma omp parallel
    {
        real e[V]; /* one exp per logit, reused for the normalisation (V <= ~256K: fits a thread's stack) */
#pragma omp for
        for (int m = 0; m < M; m++) {
            const real *l = logits + (size_t)m * V;
            real *d = dlogits + (size_t)m * V;
            real mx = l[0];
            for (int i = 1; i < V; i++) mx = l[i] > mx ? l[i] : mx;
            real sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < V; i++) sum += (e[i] = EXP(l[i] - mx));
            real inv = (real)scale / sum;
#pragma omp simd
            for (int i = 0; i < V; i++) d[i] += e[i] * inv;
            d[targets[m]] -= (real)scale;
        }
    }
}

void N_(adamw_update)(real *param, const real *grad, real *m, real *v, size_t n, float lr, float beta1, float beta2,
                      float eps, float weight_decay, float grad_scale, int t) {
    const real c1 = (real)(1.0 / (1.0 - pow(beta1, t))), c2 = (real)(1.0 / (1.0 - pow(beta2, t)));
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        real g = grad[i] * grad_scale;
        m[i] = beta1 * m[i] + (1 - beta1) * g;
        v[i] = beta2 * v[i] + (1 - beta2) * g * g;
        real mh = m[i] * c1, vh = v[i] * c2;
        param[i] -= lr * (mh / (SQRT(vh) + eps) + weight_decay * param[i]);
    }
}

double N_(sumsq)(const real *x, size_t n) {
    /* fixed chunks summed in a fixed order: the result does not depend on thread timing (bit-exact resume) */
    enum { CHUNKS = 64 };
    double part[CHUNKS];
#pragma omp parallel for
    for (int c = 0; c < CHUNKS; c++) {
        size_t lo = n * c / CHUNKS, hi = n * (c + 1) / CHUNKS;
        double acc = 0;
        for (size_t i = lo; i < hi; i++) acc += (double)x[i] * x[i];
        part[c] = acc;
    }
    double total = 0;
    for (int c = 0; c < CHUNKS; c++) total += part[c];
    return total;
}
