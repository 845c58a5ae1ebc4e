/* ops_cpu_decl.h: declarations of the CPU ops for one scalar type. Included twice by ops_cpu.h: once for
 * float (the backend) and once for double (the finite-difference tests), with OPS_REAL and OPS_NAME set.
 * Shapes are written as (rows, cols), row-major. Every backward ACCUMULATES (+=) into its gradients;
 * callers zero them first. M is a number of rows (tokens), C a width. */
#include <stddef.h>
#include <stdint.h>

/* out(M,C) = wte[tokens[m]] */
void OPS_NAME(encoder_forward)(OPS_REAL *out, const int32_t *tokens, const OPS_REAL *wte, int M, int C);
void OPS_NAME(encoder_backward)(OPS_REAL *dwte, const OPS_REAL *dout, const int32_t *tokens, int M, int C);

/* out(M,N) = inp(M,K) @ w(N,K)^T. Backward: dinp(M,K) += dout @ w (skipped if dinp NULL), dw(N,K) += dout^T @ inp. */
void OPS_NAME(matmul_forward)(OPS_REAL *out, const OPS_REAL *inp, const OPS_REAL *w, int M, int K, int N);
void OPS_NAME(matmul_backward)(OPS_REAL *dinp, OPS_REAL *dw, const OPS_REAL *dout, const OPS_REAL *inp,
                               const OPS_REAL *w, int M, int K, int N);

/* out(M,C) = inp * rstd * w, rstd(M) = 1/sqrt(mean(inp^2) + eps) */
void OPS_NAME(rmsnorm_forward)(OPS_REAL *out, OPS_REAL *rstd, const OPS_REAL *inp, const OPS_REAL *w, int M, int C,
                               float eps);
void OPS_NAME(rmsnorm_backward)(OPS_REAL *dinp, OPS_REAL *dw, const OPS_REAL *dout, const OPS_REAL *inp,
                                const OPS_REAL *w, const OPS_REAL *rstd, int M, int C);

/* Rotary embedding, rotate-half convention, on x(B,T,nh,hd): pairs (i, i+hd/2) rotate by t * theta^(-2i/hd).
 * cos_t/sin_t are (T, hd/2) tables from rope_table. */
void OPS_NAME(rope_table)(OPS_REAL *cos_t, OPS_REAL *sin_t, int T, int hd, float theta);
void OPS_NAME(rope_forward)(OPS_REAL *out, const OPS_REAL *inp, const OPS_REAL *cos_t, const OPS_REAL *sin_t, int B,
                            int T, int nh, int hd);
void OPS_NAME(rope_backward)(OPS_REAL *dinp, const OPS_REAL *dout, const OPS_REAL *cos_t, const OPS_REAL *sin_t, int B,
                             int T, int nh, int hd);

/* Causal grouped-query attention. q(B,T,H,hd), k,v(B,T,KV,hd), out(B,T,H,hd); att(B,H,T,T) keeps the
 * softmax probabilities (lower triangle) for the backward. Scale 1/sqrt(hd). Query head h reads kv head
 * h / (H/KV). */
void OPS_NAME(attention_forward)(OPS_REAL *out, OPS_REAL *att, const OPS_REAL *q, const OPS_REAL *k,
                                 const OPS_REAL *v, int B, int T, int H, int KV, int hd);
void OPS_NAME(attention_backward)(OPS_REAL *dq, OPS_REAL *dk, OPS_REAL *dv, const OPS_REAL *dout,
                                  const OPS_REAL *att, const OPS_REAL *q, const OPS_REAL *k, const OPS_REAL *v,
                                  int B, int T, int H, int KV, int hd);

/* out(M,F) = silu(h[:, :F]) * h[:, F:], h(M,2F) (gate and up projections fused). */
void OPS_NAME(swiglu_forward)(OPS_REAL *out, const OPS_REAL *h, int M, int F);
void OPS_NAME(swiglu_backward)(OPS_REAL *dh, const OPS_REAL *dout, const OPS_REAL *h, int M, int F);

/* out = a + b (n elements); out may alias a. */
void OPS_NAME(add_forward)(OPS_REAL *out, const OPS_REAL *a, const OPS_REAL *b, size_t n);

/* Router. probs(M,E) = softmax(logits) or sigmoid(logits) (the scores s). Each token picks the k experts
 * with the largest s + bias (bias may be NULL; ties go to the lower index); idx(M,k) ascending by rank.
 * gate(M,k): before-order: s of the pick, divided by the picks' sum when norm_topk; after-order (softmax
 * only): softmax over the picked logits. Times route_scale. The bias never enters the gate. With
 * p->given_idx the picks are read from idx (a policy assigned them) instead of chosen. */
void OPS_NAME(router_forward)(OPS_REAL *probs, int32_t *idx, OPS_REAL *gate, const OPS_REAL *logits,
                              const float *bias, int M, const ml_router_params *p);
/* dlogits(M,E) += d(gate)/d(logits)^T dgate + d(probs)/d(logits)^T dprobs (dprobs may be NULL). */
void OPS_NAME(router_backward)(OPS_REAL *dlogits, const OPS_REAL *dgate, const OPS_REAL *dprobs,
                               const OPS_REAL *logits, const OPS_REAL *probs, const int32_t *idx,
                               const OPS_REAL *gate, int M, const ml_router_params *p);

/* Token permutation for the experts. xe(sum counts, C): row slot[m*k+j] = inp[m] (slot -1: dropped). */
void OPS_NAME(permute_forward)(OPS_REAL *xe, const OPS_REAL *inp, const int32_t *slot, int M, int k, int C);
void OPS_NAME(permute_backward)(OPS_REAL *dinp, const OPS_REAL *dxe, const int32_t *slot, int M, int k, int C);
/* out(M,C) += sum_j gate[m,j] * ye[slot[m*k+j]]. Backward: dye[slot] += gate*dout, dgate[m,j] += <dout[m], ye[slot]>. */
void OPS_NAME(unpermute_forward)(OPS_REAL *out, const OPS_REAL *ye, const OPS_REAL *gate, const int32_t *slot, int M,
                                 int k, int C);
void OPS_NAME(unpermute_backward)(OPS_REAL *dye, OPS_REAL *dgate, const OPS_REAL *dout, const OPS_REAL *ye,
                                  const OPS_REAL *gate, const int32_t *slot, int M, int k, int C);

/* One GEMM per expert: rows offsets[e]..offsets[e+1] of inp(*,K) times w[e](N,K)^T. Empty experts are skipped
 * (their weight gradient stays as it was). */
void OPS_NAME(grouped_matmul_forward)(OPS_REAL *out, const OPS_REAL *inp, const OPS_REAL *w, const int32_t *offsets,
                                      int E, int K, int N);
void OPS_NAME(grouped_matmul_backward)(OPS_REAL *dinp, OPS_REAL *dw, const OPS_REAL *dout, const OPS_REAL *inp,
                                       const OPS_REAL *w, const int32_t *offsets, int E, int K, int N);

/* losses(M) = logsumexp(logits[m]) - logits[m, targets[m]]. Backward: dlogits += scale * (softmax - onehot). */
void OPS_NAME(crossentropy_forward)(OPS_REAL *losses, const OPS_REAL *logits, const int32_t *targets, int M, int V);
void OPS_NAME(crossentropy_backward)(OPS_REAL *dlogits, const OPS_REAL *logits, const int32_t *targets, float scale,
                                     int M, int V);

/* AdamW step t (1-based) on n values; grad is multiplied by grad_scale first (clipping). */
void OPS_NAME(adamw_update)(OPS_REAL *param, const OPS_REAL *grad, OPS_REAL *m, OPS_REAL *v, size_t n, float lr,
                            float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t);

/* sum of squares of x (n values), accumulated in double */
double OPS_NAME(sumsq)(const OPS_REAL *x, size_t n);
