// ops_cuda.cu: the CUDA backend's op table in fp32 (cuBLAS for the GEMMs, straightforward kernels for the rest):
// the same contracts as core/cpu/ops_cpu_decl.h, so core/model.c runs unchanged on one NVIDIA GPU. This first
// version is written for correctness and determinism (no atomics: every output element has one writer and
// sums run in a fixed order); bf16 tensor cores, a fused flash-style attention and cuBLAS's grouped GEMM are
// the next steps (kernels/README.md). Every CUDA and cuBLAS call is checked and names its op on failure.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend.h"
#include "backend_cuda.h"
#include "config.h"
}

static cublasHandle_t blas;

static void die(const char *op, const char *what) {
    fprintf(stderr, "moelab cuda: %s: %s\n", op, what);
    exit(1);
}
#define CK(op, call)                                                                   \
    do {                                                                               \
        cudaError_t e_ = (call);                                                       \
        if (e_ != cudaSuccess) die(op, cudaGetErrorString(e_));                        \
    } while (0)
#define BK(op, call)                                                                   \
    do {                                                                               \
        cublasStatus_t s_ = (call);                                                    \
        if (s_ != CUBLAS_STATUS_SUCCESS) die(op, cublasGetStatusString(s_));           \
    } while (0)
// a kernel launch: checks the launch itself; errors inside the kernel surface at the next sync
#define LAUNCH(op, grid, block, kernel, ...)                                           \
    do {                                                                               \
        if ((grid) > 0) {                                                              \
            kernel<<<(grid), (block)>>>(__VA_ARGS__);                                  \
            CK(op, cudaGetLastError());                                                \
        }                                                                              \
    } while (0)

static unsigned blocks(size_t n, int per = 256) { return (unsigned)((n + per - 1) / per); }

// ---- memory ----

static void *cu_alloc(size_t bytes) {
    void *p = NULL;
    CK("alloc", cudaMalloc(&p, bytes ? bytes : 64));
    CK("alloc", cudaMemset(p, 0, bytes ? bytes : 64));
    return p;
}
static void cu_free(void *p) { CK("free", cudaFree(p)); }
static void cu_memset0(void *p, size_t bytes) { CK("memset0", cudaMemset(p, 0, bytes)); }
static void cu_to_host(void *host, const void *src, size_t bytes) {
    CK("to_host", cudaMemcpy(host, src, bytes, cudaMemcpyDeviceToHost));
}
static void cu_from_host(void *dst, const void *host, size_t bytes) {
    CK("from_host", cudaMemcpy(dst, host, bytes, cudaMemcpyHostToDevice));
}
static void cu_sync(void) { CK("sync", cudaDeviceSynchronize()); }

// ---- embedding ----

__global__ void k_encoder_forward(float *out, const int32_t *tokens, const float *wte, int M, int C) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * C) return;
    int m = (int)(i / C), c = (int)(i % C);
    out[i] = wte[(size_t)tokens[m] * C + c];
}
// one thread per column, tokens in order: rows that share a token id add up in a fixed order
__global__ void k_encoder_backward(float *dwte, const float *dout, const int32_t *tokens, int M, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int m = 0; m < M; m++) dwte[(size_t)tokens[m] * C + c] += dout[(size_t)m * C + c];
}
static void cu_encoder_forward(float *out, const int32_t *tokens, const float *wte, int M, int C) {
    LAUNCH("encoder_forward", blocks((size_t)M * C), 256, k_encoder_forward, out, tokens, wte, M, C);
}
static void cu_encoder_backward(float *dwte, const float *dout, const int32_t *tokens, int M, int C) {
    LAUNCH("encoder_backward", blocks(C), 256, k_encoder_backward, dwte, dout, tokens, M, C);
}

// ---- GEMMs (row-major operands seen by column-major cuBLAS as their transposes) ----

// out(M,N) = inp(M,K) @ w(N,K)^T  <=>  out^T = w . inp^T
static void gemm_nt(const char *op, float *out, const float *inp, const float *w, int M, int K, int N, float beta) {
    const float one = 1;
    BK(op, cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, K, inp, K, &beta, out, N));
}
// dinp(M,K) += dout(M,N) @ w(N,K)
static void gemm_nn_acc(const char *op, float *dinp, const float *dout, const float *w, int M, int K, int N) {
    const float one = 1;
    BK(op, cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, &one, w, K, dout, N, &one, dinp, K));
}
// dw(N,K) += dout(M,N)^T @ inp(M,K)
static void gemm_tn_acc(const char *op, float *dw, const float *dout, const float *inp, int M, int K, int N) {
    const float one = 1;
    BK(op, cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, &one, inp, K, dout, N, &one, dw, K));
}

static void cu_matmul_forward(float *out, const float *inp, const float *w, int M, int K, int N) {
    if (M > 0) gemm_nt("matmul_forward", out, inp, w, M, K, N, 0);
}
static void cu_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, int M,
                               int K, int N) {
    if (M == 0) return;
    if (dinp) gemm_nn_acc("matmul_backward", dinp, dout, w, M, K, N);
    gemm_tn_acc("matmul_backward", dw, dout, inp, M, K, N);
}

// experts: one GEMM per non-empty expert, row ranges from the offsets (copied to the host: E + 1 ints)
static void host_offsets(const char *op, int32_t *h, const int32_t *offsets, int E) {
    CK(op, cudaMemcpy(h, offsets, sizeof(int32_t) * (E + 1), cudaMemcpyDeviceToHost));
}
static void cu_grouped_matmul_forward(float *out, const float *inp, const float *w, const int32_t *offsets, int E,
                                      int K, int N) {
    int32_t *h = (int32_t *)malloc(sizeof(int32_t) * (E + 1));
    host_offsets("grouped_matmul_forward", h, offsets, E);
    for (int e = 0; e < E; e++) {
        int n = h[e + 1] - h[e];
        if (n > 0)
            gemm_nt("grouped_matmul_forward", out + (size_t)h[e] * N, inp + (size_t)h[e] * K, w + (size_t)e * N * K, n,
                    K, N, 0);
    }
    free(h);
}
static void cu_grouped_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                       const int32_t *offsets, int E, int K, int N) {
    int32_t *h = (int32_t *)malloc(sizeof(int32_t) * (E + 1));
    host_offsets("grouped_matmul_backward", h, offsets, E);
    for (int e = 0; e < E; e++) {
        int n = h[e + 1] - h[e];
        if (n == 0) continue; // an empty expert's weight gradient stays as it was
        const float *go = dout + (size_t)h[e] * N, *x = inp + (size_t)h[e] * K;
        if (dinp) gemm_nn_acc("grouped_matmul_backward", dinp + (size_t)h[e] * K, go, w + (size_t)e * N * K, n, K, N);
        gemm_tn_acc("grouped_matmul_backward", dw + (size_t)e * N * K, go, x, n, K, N);
    }
    free(h);
}

// ---- block reductions (fixed order: deterministic) ----

template <typename T> __device__ T block_sum(T v, T *shared) {
    int t = threadIdx.x;
    shared[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) shared[t] += shared[t + s];
        __syncthreads();
    }
    T r = shared[0];
    __syncthreads();
    return r;
}
__device__ float block_max(float v, float *shared) {
    int t = threadIdx.x;
    shared[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) shared[t] = fmaxf(shared[t], shared[t + s]);
        __syncthreads();
    }
    float r = shared[0];
    __syncthreads();
    return r;
}
#define RBLOCK 256

// ---- RMSNorm ----

__global__ void k_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int C, float eps) {
    __shared__ double sh[RBLOCK];
    const float *x = inp + (size_t)blockIdx.x * C;
    double ss = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) ss += (double)x[c] * x[c];
    ss = block_sum(ss, sh);
    float r = (float)(1.0 / sqrt(ss / C + eps));
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[(size_t)blockIdx.x * C + c] = x[c] * r * w[c];
}
__global__ void k_rmsnorm_backward_dx(float *dinp, const float *dout, const float *inp, const float *w,
                                      const float *rstd, int C) {
    __shared__ double sh[RBLOCK];
    size_t row = blockIdx.x;
    const float *x = inp + row * C, *g = dout + row * C;
    double dot = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dot += (double)g[c] * w[c] * x[c];
    dot = block_sum(dot, sh);
    float r = rstd[row], coef = (float)(dot / C) * r * r * r;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dinp[row * C + c] += r * g[c] * w[c] - coef * x[c];
}
__global__ void k_rmsnorm_backward_dw(float *dw, const float *dout, const float *inp, const float *rstd, int M, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double acc = 0;
    for (int m = 0; m < M; m++) acc += (double)dout[(size_t)m * C + c] * inp[(size_t)m * C + c] * rstd[m];
    dw[c] += (float)acc;
}
static void cu_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int M, int C, float eps) {
    LAUNCH("rmsnorm_forward", M, RBLOCK, k_rmsnorm_forward, out, rstd, inp, w, C, eps);
}
static void cu_rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                const float *rstd, int M, int C) {
    LAUNCH("rmsnorm_backward", M, RBLOCK, k_rmsnorm_backward_dx, dinp, dout, inp, w, rstd, C);
    LAUNCH("rmsnorm_backward", blocks(C), 256, k_rmsnorm_backward_dw, dw, dout, inp, rstd, M, C);
}

// ---- RoPE ----

__global__ void k_rope(float *out, const float *inp, const float *cs, const float *sn, int B, int T, int nh, int hd,
                       int backward) {
    const int half = hd / 2;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, n = (size_t)B * T * nh * half;
    if (i >= n) return;
    int p = (int)(i % half);
    size_t row = i / half; // (b, t, h)
    int t = (int)(row / nh % T);
    const float *x = inp + row * hd;
    float *o = out + row * hd;
    float c = cs[(size_t)t * half + p], s = sn[(size_t)t * half + p], x1 = x[p], x2 = x[p + half];
    if (!backward) {
        o[p] = x1 * c - x2 * s;
        o[p + half] = x2 * c + x1 * s;
    } else {
        o[p] += x1 * c + x2 * s;
        o[p + half] += x2 * c - x1 * s;
    }
}
static void cu_rope_forward(float *out, const float *inp, const float *cs, const float *sn, int B, int T, int nh, int hd) {
    LAUNCH("rope_forward", blocks((size_t)B * T * nh * (hd / 2)), 256, k_rope, out, inp, cs, sn, B, T, nh, hd, 0);
}
static void cu_rope_backward(float *dinp, const float *dout, const float *cs, const float *sn, int B, int T, int nh,
                             int hd) {
    LAUNCH("rope_backward", blocks((size_t)B * T * nh * (hd / 2)), 256, k_rope, dinp, dout, cs, sn, B, T, nh, hd, 1);
}

// ---- causal grouped-query attention (one thread per query row; att keeps the probabilities) ----

__global__ void k_attention_forward(float *out, float *att, const float *q, const float *k, const float *v, int B, int T,
                                    int H, int KV, int hd) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)B * H * T) return;
    int t = (int)(i % T), h = (int)(i / T % H), b = (int)(i / ((size_t)T * H));
    const int kh = h / (H / KV);
    const float scale = rsqrtf((float)hd);
    const float *qt = q + (((size_t)b * T + t) * H + h) * hd;
    float *a = att + (((size_t)b * H + h) * T + t) * T;
    float mx = -INFINITY;
    for (int s = 0; s <= t; s++) {
        const float *ks = k + (((size_t)b * T + s) * KV + kh) * hd;
        float dot = 0;
        for (int d = 0; d < hd; d++) dot += qt[d] * ks[d];
        a[s] = dot * scale;
        mx = fmaxf(mx, a[s]);
    }
    float sum = 0;
    for (int s = 0; s <= t; s++) sum += (a[s] = expf(a[s] - mx));
    for (int s = 0; s <= t; s++) a[s] /= sum;
    for (int s = t + 1; s < T; s++) a[s] = 0;
    float *o = out + (((size_t)b * T + t) * H + h) * hd;
    for (int d = 0; d < hd; d++) {
        float acc = 0;
        for (int s = 0; s <= t; s++) acc += a[s] * v[(((size_t)b * T + s) * KV + kh) * hd + d];
        o[d] = acc;
    }
}
// dq and the softmax gradient ds(B,H,T,T) per query row
__global__ void k_attention_backward_q(float *dq, float *ds, const float *dout, const float *att, const float *k,
                                       const float *v, int B, int T, int H, int KV, int hd) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)B * H * T) return;
    int t = (int)(i % T), h = (int)(i / T % H), b = (int)(i / ((size_t)T * H));
    const int kh = h / (H / KV);
    const float scale = rsqrtf((float)hd);
    const float *a = att + (((size_t)b * H + h) * T + t) * T, *go = dout + (((size_t)b * T + t) * H + h) * hd;
    float *dsr = ds + (((size_t)b * H + h) * T + t) * T;
    float sum = 0;
    for (int s = 0; s <= t; s++) {
        const float *vs = v + (((size_t)b * T + s) * KV + kh) * hd;
        float dp = 0;
        for (int d = 0; d < hd; d++) dp += go[d] * vs[d];
        dsr[s] = dp;
        sum += a[s] * dp;
    }
    for (int s = 0; s <= t; s++) dsr[s] = a[s] * (dsr[s] - sum) * scale;
    float *dqt = dq + (((size_t)b * T + t) * H + h) * hd;
    for (int d = 0; d < hd; d++) {
        float acc = 0;
        for (int s = 0; s <= t; s++) acc += dsr[s] * k[(((size_t)b * T + s) * KV + kh) * hd + d];
        dqt[d] += acc;
    }
}
// dk, dv per (b, s, kv head, d): sums over the group's query heads and the rows t >= s
__global__ void k_attention_backward_kv(float *dk, float *dv, const float *ds, const float *dout, const float *att,
                                        const float *q, int B, int T, int H, int KV, int hd) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T * KV * hd) return;
    int d = (int)(i % hd), kh = (int)(i / hd % KV), s = (int)(i / ((size_t)hd * KV) % T), b = (int)(i / ((size_t)hd * KV * T));
    const int group = H / KV;
    float ak = 0, av = 0;
    for (int h = kh * group; h < (kh + 1) * group; h++)
        for (int t = s; t < T; t++) {
            size_t r = (((size_t)b * H + h) * T + t) * T + s, qi = (((size_t)b * T + t) * H + h) * hd + d;
            ak += ds[r] * q[qi];
            av += att[r] * dout[qi];
        }
    dk[i] += ak;
    dv[i] += av;
}
static float *ds_buf;
static size_t ds_cap;
static void cu_attention_forward(float *out, float *att, const float *q, const float *k, const float *v, int B, int T,
                                 int H, int KV, int hd) {
    LAUNCH("attention_forward", blocks((size_t)B * H * T, 128), 128, k_attention_forward, out, att, q, k, v, B, T, H,
           KV, hd);
}
static void cu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att, const float *q,
                                  const float *k, const float *v, int B, int T, int H, int KV, int hd) {
    size_t need = (size_t)B * H * T * T;
    if (need > ds_cap) { // sized by the first backward, kept for every later step
        if (ds_buf) CK("attention_backward", cudaFree(ds_buf));
        CK("attention_backward", cudaMalloc(&ds_buf, need * sizeof(float)));
        ds_cap = need;
    }
    LAUNCH("attention_backward", blocks((size_t)B * H * T, 128), 128, k_attention_backward_q, dq, ds_buf, dout, att, k,
           v, B, T, H, KV, hd);
    LAUNCH("attention_backward", blocks((size_t)B * T * KV * hd), 256, k_attention_backward_kv, dk, dv, ds_buf, dout,
           att, q, B, T, H, KV, hd);
}

// ---- SwiGLU, add ----

__global__ void k_swiglu_forward(float *out, const float *h, int M, int F) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * F) return;
    size_t m = i / F, f = i % F;
    float g = h[m * 2 * F + f], u = h[m * 2 * F + F + f];
    out[i] = g / (1 + expf(-g)) * u;
}
__global__ void k_swiglu_backward(float *dh, const float *dout, const float *h, int M, int F) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * F) return;
    size_t m = i / F, f = i % F;
    float g = h[m * 2 * F + f], u = h[m * 2 * F + F + f], d = dout[i];
    float sig = 1 / (1 + expf(-g));
    dh[m * 2 * F + F + f] += d * g * sig;
    dh[m * 2 * F + f] += d * u * sig * (1 + g * (1 - sig));
}
__global__ void k_add(float *out, const float *a, const float *b, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}
static void cu_swiglu_forward(float *out, const float *h, int M, int F) {
    LAUNCH("swiglu_forward", blocks((size_t)M * F), 256, k_swiglu_forward, out, h, M, F);
}
static void cu_swiglu_backward(float *dh, const float *dout, const float *h, int M, int F) {
    LAUNCH("swiglu_backward", blocks((size_t)M * F), 256, k_swiglu_backward, dh, dout, h, M, F);
}
static void cu_add_forward(float *out, const float *a, const float *b, size_t n) {
    LAUNCH("add_forward", blocks(n), 256, k_add, out, a, b, n);
}

// ---- router (one thread per token, the CPU's exact rules: ties go to the lower index) ----

#define MAX_E 1024
__global__ void k_router_forward(float *probs, int32_t *idx, float *gate, const float *logits, const float *bias, int M,
                                 ml_router_params p) {
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const int E = p.E, K = p.k;
    const float *l = logits + (size_t)m * E;
    float *s = probs + (size_t)m * E;
    if (p.score == SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) s[e] = 1 / (1 + expf(-l[e]));
    } else {
        float mx = l[0], sum = 0;
        for (int e = 1; e < E; e++) mx = fmaxf(mx, l[e]);
        for (int e = 0; e < E; e++) sum += (s[e] = expf(l[e] - mx));
        for (int e = 0; e < E; e++) s[e] /= sum;
    }
    int32_t *id = idx + (size_t)m * K;
    for (int j = 0; j < K && !p.given_idx; j++) {
        int best = -1;
        float bv = 0;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= id[i] == e;
            if (taken) continue;
            float kv = s[e] + (bias ? bias[e] : 0);
            if (best < 0 || kv > bv) best = e, bv = kv;
        }
        id[j] = best;
    }
    float *g = gate + (size_t)m * K;
    if (p.softmax_order == SOFTMAX_AFTER_TOPK) {
        float mx = l[id[0]], sum = 0;
        for (int j = 1; j < K; j++) mx = fmaxf(mx, l[id[j]]);
        for (int j = 0; j < K; j++) sum += (g[j] = expf(l[id[j]] - mx));
        for (int j = 0; j < K; j++) g[j] = g[j] / sum * p.route_scale;
    } else {
        float sum = 0;
        for (int j = 0; j < K; j++) sum += (g[j] = s[id[j]]);
        float f = p.norm_topk ? p.route_scale / sum : p.route_scale;
        for (int j = 0; j < K; j++) g[j] *= f;
    }
}
__global__ void k_router_backward(float *dlogits, const float *dgate, const float *dprobs, const float *probs,
                                  const int32_t *idx, const float *gate, int M, ml_router_params p) {
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const int E = p.E, K = p.k;
    const float *s = probs + (size_t)m * E, *g = gate + (size_t)m * K, *dg = dgate + (size_t)m * K;
    const int32_t *id = idx + (size_t)m * K;
    float *dl = dlogits + (size_t)m * E;
    float ds[MAX_E];
    for (int e = 0; e < E; e++) ds[e] = dprobs ? dprobs[(size_t)m * E + e] : 0;
    if (p.softmax_order == SOFTMAX_AFTER_TOPK) {
        float dot = 0;
        for (int j = 0; j < K; j++) dot += g[j] * dg[j];
        dot /= p.route_scale;
        for (int j = 0; j < K; j++) dl[id[j]] += g[j] * (dg[j] - dot);
    } else if (p.norm_topk) {
        float S = 0, dot = 0;
        for (int j = 0; j < K; j++) S += s[id[j]], dot += g[j] * dg[j];
        for (int j = 0; j < K; j++) ds[id[j]] += (p.route_scale * dg[j] - dot) / S;
    } else {
        for (int j = 0; j < K; j++) ds[id[j]] += p.route_scale * dg[j];
    }
    if (p.score == SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) dl[e] += ds[e] * s[e] * (1 - s[e]);
    } else {
        float dot = 0;
        for (int e = 0; e < E; e++) dot += s[e] * ds[e];
        for (int e = 0; e < E; e++) dl[e] += s[e] * (ds[e] - dot);
    }
}
static void cu_router_forward(float *probs, int32_t *idx, float *gate, const float *logits, const float *bias, int M,
                              const ml_router_params *p) {
    if (p->E > MAX_E) die("router_forward", "more than 1024 experts");
    LAUNCH("router_forward", blocks(M, 128), 128, k_router_forward, probs, idx, gate, logits, bias, M, *p);
}
static void cu_router_backward(float *dlogits, const float *dgate, const float *dprobs, const float *logits,
                               const float *probs, const int32_t *idx, const float *gate, int M,
                               const ml_router_params *p) {
    (void)logits;
    LAUNCH("router_backward", blocks(M, 128), 128, k_router_backward, dlogits, dgate, dprobs, probs, idx, gate, M, *p);
}

// ---- dispatch: stable counting sort by expert (one thread: M*k is small next to the GEMMs) ----

__global__ void k_moe_dispatch(int32_t *counts, int32_t *offsets, int32_t *slot, const int32_t *idx, int M, int k, int E) {
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (int i = 0; i < M * k; i++)
        if (idx[i] >= 0) counts[idx[i]]++;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    for (int e = 0; e < E; e++) counts[e] = offsets[e]; // fill pointers, restored below
    for (int i = 0; i < M * k; i++) slot[i] = idx[i] >= 0 ? counts[idx[i]]++ : -1;
    for (int e = 0; e < E; e++) counts[e] = offsets[e + 1] - offsets[e];
}
static void cu_moe_dispatch(int32_t *counts, int32_t *offsets, int32_t *slot, const int32_t *idx, int M, int k, int E) {
    LAUNCH("moe_dispatch", 1, 1, k_moe_dispatch, counts, offsets, slot, idx, M, k, E);
}

// ---- permute / unpermute ----

__global__ void k_permute_forward(float *xe, const float *inp, const int32_t *slot, int M, int k, int C) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * k * C) return;
    size_t mj = i / C;
    int r = slot[mj], c = (int)(i % C);
    if (r >= 0) xe[(size_t)r * C + c] = inp[(mj / k) * C + c];
}
__global__ void k_permute_backward(float *dinp, const float *dxe, const int32_t *slot, int M, int k, int C) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * C) return;
    size_t m = i / C;
    int c = (int)(i % C);
    float acc = 0;
    for (int j = 0; j < k; j++) {
        int r = slot[m * k + j];
        if (r >= 0) acc += dxe[(size_t)r * C + c];
    }
    dinp[i] += acc;
}
__global__ void k_unpermute_forward(float *out, const float *ye, const float *gate, const int32_t *slot, int M, int k,
                                    int C) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * C) return;
    size_t m = i / C;
    int c = (int)(i % C);
    float acc = out[i];
    for (int j = 0; j < k; j++) {
        int r = slot[m * k + j];
        if (r >= 0) acc += gate[m * k + j] * ye[(size_t)r * C + c];
    }
    out[i] = acc;
}
__global__ void k_unpermute_backward_dye(float *dye, const float *dout, const float *gate, const int32_t *slot, int M,
                                         int k, int C) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)M * k * C) return;
    size_t mj = i / C;
    int r = slot[mj], c = (int)(i % C);
    if (r >= 0) dye[(size_t)r * C + c] += gate[mj] * dout[(mj / k) * C + c];
}
__global__ void k_unpermute_backward_dgate(float *dgate, const float *dout, const float *ye, const int32_t *slot, int M,
                                           int k, int C) {
    __shared__ float sh[RBLOCK];
    size_t mj = blockIdx.x;
    int r = slot[mj];
    float dot = 0;
    if (r >= 0)
        for (int c = threadIdx.x; c < C; c += blockDim.x) dot += dout[(mj / k) * C + c] * ye[(size_t)r * C + c];
    dot = block_sum(dot, sh);
    if (threadIdx.x == 0 && r >= 0) dgate[mj] += dot;
}
static void cu_permute_forward(float *xe, const float *inp, const int32_t *slot, int M, int k, int C) {
    LAUNCH("permute_forward", blocks((size_t)M * k * C), 256, k_permute_forward, xe, inp, slot, M, k, C);
}
static void cu_permute_backward(float *dinp, const float *dxe, const int32_t *slot, int M, int k, int C) {
    LAUNCH("permute_backward", blocks((size_t)M * C), 256, k_permute_backward, dinp, dxe, slot, M, k, C);
}
static void cu_unpermute_forward(float *out, const float *ye, const float *gate, const int32_t *slot, int M, int k,
                                 int C) {
    LAUNCH("unpermute_forward", blocks((size_t)M * C), 256, k_unpermute_forward, out, ye, gate, slot, M, k, C);
}
static void cu_unpermute_backward(float *dye, float *dgate, const float *dout, const float *ye, const float *gate,
                                  const int32_t *slot, int M, int k, int C) {
    LAUNCH("unpermute_backward", blocks((size_t)M * k * C), 256, k_unpermute_backward_dye, dye, dout, gate, slot, M, k,
           C);
    LAUNCH("unpermute_backward", M * k, RBLOCK, k_unpermute_backward_dgate, dgate, dout, ye, slot, M, k, C);
}

// ---- cross-entropy (one block per row) ----

__device__ float row_max(const float *l, int V, float *shared) {
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, l[i]);
    return block_max(mx, shared);
}

__global__ void k_crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int V) {
    __shared__ float shf[RBLOCK];
    __shared__ double shd[RBLOCK];
    const float *l = logits + (size_t)blockIdx.x * V;
    const float mx = row_max(l, V, shf);
    double sum = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(l[i] - mx);
    sum = block_sum(sum, shd);
    if (threadIdx.x == 0) losses[blockIdx.x] = (float)(log(sum) + mx - l[targets[blockIdx.x]]);
}
__global__ void k_crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets, float scale, int V) {
    __shared__ float shf[RBLOCK];
    const float *l = logits + (size_t)blockIdx.x * V;
    float *d = dlogits + (size_t)blockIdx.x * V;
    const float mx = row_max(l, V, shf);
    float sum = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(l[i] - mx);
    sum = block_sum(sum, shf);
    const float inv = scale / sum;
    for (int i = threadIdx.x; i < V; i += blockDim.x) d[i] += expf(l[i] - mx) * inv;
    if (threadIdx.x == 0) d[targets[blockIdx.x]] -= scale;
}
static void cu_crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int M, int V) {
    LAUNCH("crossentropy_forward", M, RBLOCK, k_crossentropy_forward, losses, logits, targets, V);
}
static void cu_crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets, float scale, int M,
                                     int V) {
    LAUNCH("crossentropy_backward", M, RBLOCK, k_crossentropy_backward, dlogits, logits, targets, scale, V);
}

// ---- AdamW, sum of squares ----

__global__ void k_adamw(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                        float beta2, float eps, float wd, float grad_scale, float c1, float c2) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grad[i] * grad_scale;
    m[i] = beta1 * m[i] + (1 - beta1) * g;
    v[i] = beta2 * v[i] + (1 - beta2) * g * g;
    float mh = m[i] * c1, vh = v[i] * c2;
    param[i] -= lr * (mh / (sqrtf(vh) + eps) + wd * param[i]);
}
static void cu_adamw_update(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                            float beta2, float eps, float weight_decay, float grad_scale, int t) {
    const float c1 = (float)(1.0 / (1.0 - pow(beta1, t))), c2 = (float)(1.0 / (1.0 - pow(beta2, t)));
    LAUNCH("adamw_update", blocks(n), 256, k_adamw, param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, grad_scale,
           c1, c2);
}

#define SUMSQ_BLOCKS 256
__global__ void k_sumsq(double *part, const float *x, size_t n) {
    __shared__ double sh[RBLOCK];
    size_t lo = n * blockIdx.x / SUMSQ_BLOCKS, hi = n * (blockIdx.x + 1) / SUMSQ_BLOCKS;
    double acc = 0;
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) acc += (double)x[i] * x[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}
static double *sumsq_part;
static double cu_sumsq(const float *x, size_t n) {
    if (!sumsq_part) CK("sumsq", cudaMalloc(&sumsq_part, sizeof(double) * SUMSQ_BLOCKS));
    LAUNCH("sumsq", SUMSQ_BLOCKS, RBLOCK, k_sumsq, sumsq_part, x, n);
    double h[SUMSQ_BLOCKS], total = 0;
    CK("sumsq", cudaMemcpy(h, sumsq_part, sizeof h, cudaMemcpyDeviceToHost));
    for (int i = 0; i < SUMSQ_BLOCKS; i++) total += h[i];
    return total;
}

// ---- the peak the benchmark compares with ----

extern "C" double cuda_sgemm_peak(int n, int reps) {
    backend_cuda(); // the handle
    float *a, *b, *c;
    size_t bytes = sizeof(float) * (size_t)n * n;
    CK("sgemm_peak", cudaMalloc(&a, bytes));
    CK("sgemm_peak", cudaMalloc(&b, bytes));
    CK("sgemm_peak", cudaMalloc(&c, bytes));
    CK("sgemm_peak", cudaMemset(a, 0, bytes));
    CK("sgemm_peak", cudaMemset(b, 0, bytes));
    cudaEvent_t t0, t1;
    CK("sgemm_peak", cudaEventCreate(&t0));
    CK("sgemm_peak", cudaEventCreate(&t1));
    const float one = 1, zero = 0;
    double best = 0;
    for (int r = 0; r < reps + 1; r++) { // the first is a warmup
        CK("sgemm_peak", cudaEventRecord(t0));
        BK("sgemm_peak", cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, n, b, n, &zero, c, n));
        CK("sgemm_peak", cudaEventRecord(t1));
        CK("sgemm_peak", cudaEventSynchronize(t1));
        float ms;
        CK("sgemm_peak", cudaEventElapsedTime(&ms, t0, t1));
        double gf = 2.0 * n * (double)n * n / (ms * 1e-3) / 1e9;
        if (r > 0 && gf > best) best = gf;
    }
    cudaEventDestroy(t0), cudaEventDestroy(t1);
    cudaFree(a), cudaFree(b), cudaFree(c);
    return best;
}

// ---- the table ----

extern "C" int cuda_available(char *why, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        snprintf(why, cap, "%s", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
        return 0;
    }
    cudaDeviceProp prop;
    CK("cuda_available", cudaGetDeviceProperties(&prop, 0));
    snprintf(why, cap, "%s (sm_%d%d, %.0f GiB)", prop.name, prop.major, prop.minor, prop.totalGlobalMem / 1073741824.0);
    return 1;
}

extern "C" const ml_backend *backend_cuda(void) {
    static ml_backend b;
    if (!blas) {
        BK("cublasCreate", cublasCreate(&blas));
        // fp32 mode: true fp32 GEMMs (no TF32), so the GPU matches the CPU op for op
        BK("cublasSetMathMode", cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH));
        b.name = "cuda";
        b.alloc = cu_alloc, b.free = cu_free, b.memset0 = cu_memset0, b.to_host = cu_to_host;
        b.from_host = cu_from_host, b.sync = cu_sync;
        b.encoder_forward = cu_encoder_forward, b.encoder_backward = cu_encoder_backward;
        b.matmul_forward = cu_matmul_forward, b.matmul_backward = cu_matmul_backward;
        b.rmsnorm_forward = cu_rmsnorm_forward, b.rmsnorm_backward = cu_rmsnorm_backward;
        b.rope_forward = cu_rope_forward, b.rope_backward = cu_rope_backward;
        b.attention_forward = cu_attention_forward, b.attention_backward = cu_attention_backward;
        b.swiglu_forward = cu_swiglu_forward, b.swiglu_backward = cu_swiglu_backward;
        b.add_forward = cu_add_forward;
        b.router_forward = cu_router_forward, b.router_backward = cu_router_backward;
        b.moe_dispatch = cu_moe_dispatch;
        b.permute_forward = cu_permute_forward, b.permute_backward = cu_permute_backward;
        b.unpermute_forward = cu_unpermute_forward, b.unpermute_backward = cu_unpermute_backward;
        b.grouped_matmul_forward = cu_grouped_matmul_forward, b.grouped_matmul_backward = cu_grouped_matmul_backward;
        b.crossentropy_forward = cu_crossentropy_forward, b.crossentropy_backward = cu_crossentropy_backward;
        b.adamw_update = cu_adamw_update;
        b.sumsq = cu_sumsq;
    }
    return &b;
}
