/* backend.h: the op table through which the model runs. The model's forward and backward (model.c) are
 * written once against this table; core/cpu/backend_cpu.c fills it with the CPU ops and kernels/ (CUDA)
 * will fill it with device kernels. Pointers passed to ops are backend memory from alloc(). Each op's
 * contract is in core/cpu/ops_cpu_decl.h; every backward accumulates (+=) into its gradients. */
#ifndef MOELAB_BACKEND_H
#define MOELAB_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "ops_types.h"

/* What the model will ask of a backend, for its scratch: the largest activation any GEMM gets (floats), the
 * tokens per micro-batch, the largest k, the experts, the model width and the attention shape. */
typedef struct ml_backend_plan {
    size_t max_gemm_floats;
    int M, kmax, E, C, B, T, H, KV, hd;
} ml_backend_plan;

/* Time spent in one op of a table over a profiled stretch (the CUDA backend's event profiler fills these). */
typedef struct ml_op_time {
    const char *op;
    double ms;
    long calls;
} ml_op_time;

typedef struct ml_backend {
    const char *name;

    /* memory: zero-filled allocation, release, fills and host <-> backend copies */
    void *(*alloc)(size_t bytes);
    void (*free)(void *p);
    void (*memset0)(void *p, size_t bytes);
    /* optional (NULL: memset0 does it), for gradients only (never bound parameters, whose bf16 shadow it would
     * not refresh): zero [p, p + bytes) later, when the next grouped_matmul_backward whose dw is
     * exactly this range writes it whole (its products written, not added; empty experts zeroed), so an experts'
     * weight gradient is written once per step instead of zeroed, read and written. Any other use of such a range
     * through the table (copies, memset0, sumsq, adamw_update; free: of any memory) zeroes it first. */
    void (*zero_deferred)(void *p, size_t bytes);
    void (*to_host)(void *host, const void *src, size_t bytes);
    void (*from_host)(void *dst, const void *host, size_t bytes);
    void (*sync)(void);
    /* optional (NULL on the CPU): called once by model_init, before any step. prepare sizes the backend's
     * scratch so that no step allocates; bind_params names the fp32 master weights, which a mixed-precision
     * backend shadows in bf16 (every write to them goes through this table: from_host, memset0, adamw). */
    void (*prepare)(const struct ml_backend_plan *plan);
    void (*bind_params)(const float *params, size_t n);
    /* optional (NULL on the CPU, where to_host is a memcpy): host memory the backend can copy into while it
     * works (pinned), and such a copy, queued behind the work before it and complete after the next sync or
     * to_host */
    void *(*host_alloc)(size_t bytes);
    void (*host_free)(void *p);
    void (*to_host_async)(void *host, const void *src, size_t bytes);

    void (*encoder_forward)(float *out, const int32_t *tokens, const float *wte, int M, int C);
    void (*encoder_backward)(float *dwte, const float *dout, const int32_t *tokens, int M, int C);
    void (*matmul_forward)(float *out, const float *inp, const float *w, int M, int K, int N);
    void (*matmul_backward)(float *dinp, float *dw, const float *dout, const float *inp, const float *w, int M, int K,
                            int N);
    void (*rmsnorm_forward)(float *out, float *rstd, const float *inp, const float *w, int M, int C, float eps);
    void (*rmsnorm_backward)(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                             const float *rstd, int M, int C);
    void (*rope_forward)(float *out, const float *inp, const float *cos_t, const float *sin_t, int B, int T, int nh,
                         int hd);
    void (*rope_backward)(float *dinp, const float *dout, const float *cos_t, const float *sin_t, int B, int T,
                          int nh, int hd);
    /* att is the backend's saved attention state, attention_state_floats(B, T, H) floats: the CPU keeps the
     * probabilities (B,H,T,T), the CUDA backend (flash-style) the softmax statistics (2 x B,H,T) */
    size_t (*attention_state_floats)(int B, int T, int H);
    void (*attention_forward)(float *out, float *att, const float *q, const float *k, const float *v, int B, int T,
                              int H, int KV, int hd);
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout, const float *out, float *att,
                               const float *q, const float *k, const float *v, int B, int T, int H, int KV, int hd);
    void (*swiglu_forward)(float *out, const float *h, int M, int F);
    void (*swiglu_backward)(float *dh, const float *dout, const float *h, int M, int F);
    void (*add_forward)(float *out, const float *a, const float *b, size_t n);
    void (*router_forward)(float *probs, int32_t *idx, float *gate, const float *logits, const float *bias, int M,
                           const ml_router_params *p);
    void (*router_backward)(float *dlogits, const float *dgate, const float *dprobs, const float *logits,
                            const float *probs, const int32_t *idx, const float *gate, int M,
                            const ml_router_params *p);
    /* routing statistics of one micro-batch, reduced where the scores live, per segment of seg tokens (the
     * sequences; seg divides M): psum(M/seg, E) = sum over the segment's tokens of probs(t,e) / S_t (double),
     * S_t = sum_e' probs(t,e'); selected(M/seg, E) = choices per expert in its rows of idx(M,k) (-1 skipped) */
    void (*route_stats)(double *psum, int32_t *selected, const float *probs, const int32_t *idx, int M, int k, int E,
                        int seg);
    /* the gradient of lbl losses (policy.h) with the coefficients folded into g(M/seg, E): for every token t of
     * segment b, dprobs(t,e) += scale / S_t * (g_be - sum_i g_bi probs(t,i) / S_t) */
    void (*lbl_backward)(float *dprobs, const float *probs, const float *g, float scale, int M, int E, int seg);
    /* the z-loss's statistic: zsum (one double) = sum over tokens of logsumexp(logits_t)^2; its gradient:
     * dlogits(t,e) += scale * lse_t * softmax(logits_t)_e */
    void (*zloss_forward)(double *zsum, const float *logits, int M, int E);
    void (*zloss_backward)(float *dlogits, const float *logits, float scale, int M, int E);
    /* top1_loss's statistics: fsum(E) = sum over tokens of p_t = softmax(logits_t / tau), ssum (one double) =
     * sum over tokens of the chosen scores probs(t, idx(t,j)); its gradient, with the coefficients folded into
     * c(E) and a: dlogits(t,e) += cscale p_te (c_e - sum_i p_ti c_i) / tau, dprobs(t, idx(t,j)) += a */
    void (*tempered_forward)(double *fsum, double *ssum, const float *logits, const float *probs, const int32_t *idx,
                             float tau, int M, int k, int E);
    void (*tempered_backward)(float *dlogits, float *dprobs, const float *logits, const int32_t *idx, const float *c,
                              float cscale, float a, float tau, int M, int k, int E);
    /* capacity drops, given moe_dispatch's offsets and slot for idx: route(M,k) = idx where the choice is among
     * its expert's first cap (by_score: the highest probs(t,e), ties to the earlier choice; else the earliest
     * choices), -1 elsewhere */
    void (*capacity_route)(int32_t *route, const int32_t *idx, const float *probs, const int32_t *offsets,
                           const int32_t *slot, int cap, int by_score, int M, int k, int E);
    /* counting sort of the choices idx(M,k) by expert (idx -1 = dropped): counts(E), offsets(E+1), slot(M*k) */
    void (*moe_dispatch)(int32_t *counts, int32_t *offsets, int32_t *slot, const int32_t *idx, int M, int k, int E);
    void (*permute_forward)(float *xe, const float *inp, const int32_t *slot, int M, int k, int C);
    void (*permute_backward)(float *dinp, const float *dxe, const int32_t *slot, int M, int k, int C);
    void (*unpermute_forward)(float *out, const float *ye, const float *gate, const int32_t *slot, int M, int k,
                              int C);
    void (*unpermute_backward)(float *dye, float *dgate, const float *dout, const float *ye, const float *gate,
                               const int32_t *slot, int M, int k, int C);
    void (*grouped_matmul_forward)(float *out, const float *inp, const float *w, const int32_t *offsets, int E, int K,
                                   int N);
    void (*grouped_matmul_backward)(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                    const int32_t *offsets, int E, int K, int N);
    void (*crossentropy_forward)(float *losses, const float *logits, const int32_t *targets, int M, int V);
    void (*crossentropy_backward)(float *dlogits, const float *logits, const int32_t *targets, float scale, int M,
                                  int V);
    void (*adamw_update)(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                         float beta2, float eps, float weight_decay, float grad_scale, int t);
    double (*sumsq)(const float *x, size_t n);
} ml_backend;

/* The CPU backend (OpenBLAS + OpenMP). */
const ml_backend *backend_cpu(void);

/* A backend by name: "cpu", "cuda" (bf16 GEMMs, fp32 master weights), "cuda-fp32" (ML_EINPUT for either when
 * moelab was built without CUDA or no GPU is usable, naming why) or "auto" (cuda when usable, else cpu).
 * NULL or "" = cpu. Returns 0 or ML_EINPUT (-2) with msg. */
int backend_select(const char *name, const ml_backend **be, char *msg, size_t cap);

#endif
