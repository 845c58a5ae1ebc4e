// attention_cuda.cu: causal grouped-query attention, flash-style (Dao et al. 2022): the forward streams keys
// and values through shared memory in tiles with an online softmax and keeps only the log-sum-exp per query
// row; the backward recomputes the probabilities tile by tile. Memory is O(B H T), so 2-4K sequences fit.
// Layouts: q (B,T,H,hd), k and v (B,T,KV,hd), out (B,T,H,hd); the saved state att holds lse (B,H,T) then
// delta = rowsum(dout * out) (B,H,T), written by the backward. One warp per query row (forward, dq) or per
// key row (dk, dv); lanes take one key (or query) each for the dot products and hd/32 dimensions each for the
// accumulations. fp32 throughout, deterministic (every output element has one writer, fixed order).
#include "cuda_common.cuh"

#define HD_MAX 128
#define DPL (HD_MAX / 32) // dimensions per lane
#define ROWS 8            // query (or key) rows per block: one warp each
#define TILE 32           // keys (or queries) per shared-memory tile: one per lane
#define FULL 0xffffffffu

// the saved state: the log-sum-exp and delta per query row (both tables; cuda_plan_memory counts it too)
extern "C" size_t cuda_attention_state_floats(int B, int T, int H) { return 2 * (size_t)B * H * T; }

// rows [r0, r0 + n) of head h of a (B,T,heads,hd) tensor a into A (row stride ld), zeros past T; the same
// rows of c into C when c is given
__device__ void load_rows(float *A, float *C, int ld, const float *a, const float *c, int b, int r0, int n, int T,
                          int heads, int h, int hd) {
    for (int i = threadIdx.x; i < n * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd, t = r0 + r;
        size_t g = (((size_t)b * T + t) * heads + h) * hd + d;
        A[r * ld + d] = t < T ? a[g] : 0.f;
        if (c) C[r * ld + d] = t < T ? c[g] : 0.f;
    }
}

__global__ void k_flash_forward(float *out, float *lse, const float *q, const float *k, const float *v, int T, int H,
                                int KV, int hd, float scale) {
    ML_DYNAMIC_SMEM(float, sm);
    const int ld = hd + 1; // padded rows: lane j reading row j hits bank (j + d) % 32
    float *Ks = sm, *Vs = Ks + TILE * ld, *Qs = Vs + TILE * ld;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int qt = gridDim.x - 1 - blockIdx.x; // the longest rows start first
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / KV);
    const int t0 = qt * ROWS, t = t0 + warp, t_last = min(T - 1, t0 + ROWS - 1);
    const bool active = t < T;
    load_rows(Qs, NULL, hd, q, NULL, b, t0, ROWS, T, H, h, hd);
    float acc[DPL] = {0}, m_run = -INFINITY, l_run = 0;
    for (int s0 = 0; s0 <= t_last; s0 += TILE) {
        __syncthreads(); // the previous tile is consumed
        load_rows(Ks, Vs, ld, k, v, b, s0, TILE, T, KV, kh, hd);
        __syncthreads();
        if (!active || s0 > t) continue; // warp-uniform
        const int s = s0 + lane;
        float sc = -INFINITY;
        if (s <= t) {
            const float *qr = Qs + warp * hd, *kr = Ks + lane * ld;
            float dot = 0;
            for (int d = 0; d < hd; d++) dot += qr[d] * kr[d];
            sc = dot * scale;
        }
        const float m_new = fmaxf(m_run, warp_max(sc)); // finite: key s0 <= t is in this tile
        const float p = expf(sc - m_new), corr = expf(m_run - m_new);
        l_run = l_run * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= corr;
        const int nk = min(TILE, t - s0 + 1);
        for (int j = 0; j < nk; j++) {
            const float pj = __shfl_sync(FULL, p, j);
            const float *vr = Vs + j * ld;
#pragma unroll
            for (int i = 0; i < DPL; i++)
                if (lane + 32 * i < hd) acc[i] += pj * vr[lane + 32 * i];
        }
        m_run = m_new;
    }
    if (!active) return;
    const float inv = 1 / l_run;
    float *o = out + (((size_t)b * T + t) * H + h) * hd;
#pragma unroll
    for (int i = 0; i < DPL; i++)
        if (lane + 32 * i < hd) o[lane + 32 * i] = acc[i] * inv;
    if (lane == 0) lse[((size_t)b * H + h) * T + t] = m_run + logf(l_run);
}

// delta(b,h,t) = sum_d dout * out: one warp per row
__global__ void k_flash_delta(float *delta, const float *dout, const float *out, int B, int T, int H, int hd) {
    size_t row = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32; // (b, t, h)
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)B * T * H) return;
    const float *g = dout + row * hd, *o = out + row * hd;
    float acc = 0;
    for (int d = lane; d < hd; d += 32) acc += g[d] * o[d];
    acc = warp_sum(acc);
    const int h = (int)(row % H), t = (int)(row / H % T), b = (int)(row / ((size_t)H * T));
    if (lane == 0) delta[((size_t)b * H + h) * T + t] = acc;
}

void ml_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int H, int hd) {
    LAUNCH("attention_backward", ml_blocks((size_t)B * T * H, ROWS), 32 * ROWS, k_flash_delta, delta, dout, out, B, T,
           H, hd);
}

// dq: one warp per query row, key tiles as in the forward
__global__ void k_flash_backward_dq(float *dq, const float *dout, const float *lse, const float *delta, const float *q,
                                    const float *k, const float *v, int T, int H, int KV, int hd, float scale) {
    ML_DYNAMIC_SMEM(float, sm);
    const int ld = hd + 1;
    float *Ks = sm, *Vs = Ks + TILE * ld, *Qs = Vs + TILE * ld, *Gs = Qs + ROWS * hd;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / KV);
    const int t0 = qt * ROWS, t = t0 + warp, t_last = min(T - 1, t0 + ROWS - 1);
    const bool active = t < T;
    load_rows(Qs, Gs, hd, q, dout, b, t0, ROWS, T, H, h, hd);
    const size_t row = ((size_t)b * H + h) * T + t;
    const float L = active ? lse[row] : 0.f, D = active ? delta[row] : 0.f;
    float acc[DPL] = {0};
    for (int s0 = 0; s0 <= t_last; s0 += TILE) {
        __syncthreads();
        load_rows(Ks, Vs, ld, k, v, b, s0, TILE, T, KV, kh, hd);
        __syncthreads();
        if (!active || s0 > t) continue;
        const int s = s0 + lane;
        float ds = 0;
        if (s <= t) {
            const float *qr = Qs + warp * hd, *gr = Gs + warp * hd, *kr = Ks + lane * ld, *vr = Vs + lane * ld;
            float qk = 0, gv = 0;
            for (int d = 0; d < hd; d++) qk += qr[d] * kr[d], gv += gr[d] * vr[d];
            const float p = expf(qk * scale - L);
            ds = p * (gv - D) * scale;
        }
        const int nk = min(TILE, t - s0 + 1);
        for (int j = 0; j < nk; j++) {
            const float dsj = __shfl_sync(FULL, ds, j);
            const float *kr = Ks + j * ld;
#pragma unroll
            for (int i = 0; i < DPL; i++)
                if (lane + 32 * i < hd) acc[i] += dsj * kr[lane + 32 * i];
        }
    }
    if (!active) return;
    float *o = dq + (((size_t)b * T + t) * H + h) * hd;
#pragma unroll
    for (int i = 0; i < DPL; i++)
        if (lane + 32 * i < hd) o[lane + 32 * i] += acc[i];
}

// dk, dv: one warp per key row s of kv head kh; query tiles t >= s of every query head of the group
__global__ void k_flash_backward_dkv(float *dk, float *dv, const float *dout, const float *lse, const float *delta,
                                     const float *q, const float *k, const float *v, int T, int H, int KV, int hd,
                                     float scale) {
    ML_DYNAMIC_SMEM(float, sm);
    const int ld = hd + 1;
    float *Qs = sm, *Gs = Qs + TILE * ld, *Kr = Gs + TILE * ld, *Vr = Kr + ROWS * hd, *Ls = Vr + ROWS * hd;
    float *Ds = Ls + TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kh = blockIdx.y, b = blockIdx.z, group = H / KV;
    const int s_first = blockIdx.x * ROWS, s = s_first + warp; // the first key rows have the most queries
    const bool active = s < T;
    load_rows(Kr, Vr, hd, k, v, b, s_first, ROWS, T, KV, kh, hd);
    float acck[DPL] = {0}, accv[DPL] = {0};
    for (int h = kh * group; h < (kh + 1) * group; h++)
        for (int t0 = s_first; t0 < T; t0 += TILE) {
            __syncthreads();
            load_rows(Qs, Gs, ld, q, dout, b, t0, TILE, T, H, h, hd);
            for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
                size_t row = ((size_t)b * H + h) * T + t0 + r;
                Ls[r] = t0 + r < T ? lse[row] : 0.f;
                Ds[r] = t0 + r < T ? delta[row] : 0.f;
            }
            __syncthreads();
            if (!active) continue;
            const int t = t0 + lane;
            float p = 0, ds = 0;
            if (t < T && t >= s) {
                const float *qr = Qs + lane * ld, *gr = Gs + lane * ld, *kr = Kr + warp * hd, *vr = Vr + warp * hd;
                float qk = 0, gv = 0;
                for (int d = 0; d < hd; d++) qk += qr[d] * kr[d], gv += gr[d] * vr[d];
                p = expf(qk * scale - Ls[lane]);
                ds = p * (gv - Ds[lane]) * scale;
            }
            const int nq = min(TILE, T - t0);
            for (int j = 0; j < nq; j++) {
                const float pj = __shfl_sync(FULL, p, j), dsj = __shfl_sync(FULL, ds, j);
                const float *qr = Qs + j * ld, *gr = Gs + j * ld;
#pragma unroll
                for (int i = 0; i < DPL; i++)
                    if (lane + 32 * i < hd) accv[i] += pj * gr[lane + 32 * i], acck[i] += dsj * qr[lane + 32 * i];
            }
        }
    if (!active) return;
    const size_t o = (((size_t)b * T + s) * KV + kh) * hd;
#pragma unroll
    for (int i = 0; i < DPL; i++)
        if (lane + 32 * i < hd) dk[o + lane + 32 * i] += acck[i], dv[o + lane + 32 * i] += accv[i];
}

static void check_shape(const char *op, int H, int KV, int hd) {
    if (hd > HD_MAX) ml_cuda_die(op, "head dimension above 128");
    if (KV <= 0 || H % KV) ml_cuda_die(op, "heads not a multiple of kv_heads");
}
static float attn_scale(int hd) { return (float)(1.0 / sqrt((double)hd)); }

static void cu_attention_forward(float *out, float *att, const float *q, const float *k, const float *v, int B, int T,
                                 int H, int KV, int hd) {
    PROF("attention_forward");
    check_shape("attention_forward", H, KV, hd);
    const size_t smem = sizeof(float) * (2 * TILE * (hd + 1) + ROWS * hd);
    dim3 grid((T + ROWS - 1) / ROWS, H, B);
    LAUNCH_SMEM("attention_forward", grid, 32 * ROWS, smem, k_flash_forward, out, att, q, k, v, T, H, KV, hd,
                attn_scale(hd));
}
static void cu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, float *att,
                                  const float *q, const float *k, const float *v, int B, int T, int H, int KV,
                                  int hd) {
    PROF("attention_backward");
    check_shape("attention_backward", H, KV, hd);
    const float *lse = att;
    float *delta = att + (size_t)B * H * T;
    ml_attention_delta(delta, dout, out, B, T, H, hd);
    const size_t smem_q = sizeof(float) * (2 * TILE * (hd + 1) + 2 * ROWS * hd);
    dim3 grid_q((T + ROWS - 1) / ROWS, H, B);
    LAUNCH_SMEM("attention_backward", grid_q, 32 * ROWS, smem_q, k_flash_backward_dq, dq, dout, lse, delta, q, k, v, T,
                H, KV, hd, attn_scale(hd));
    const size_t smem_kv = sizeof(float) * (2 * TILE * (hd + 1) + 2 * ROWS * hd + 2 * TILE);
    dim3 grid_kv((T + ROWS - 1) / ROWS, KV, B);
    LAUNCH_SMEM("attention_backward", grid_kv, 32 * ROWS, smem_kv, k_flash_backward_dkv, dk, dv, dout, lse, delta, q, k,
                v, T, H, KV, hd, attn_scale(hd));
}

void ml_cuda_fill_attention(ml_backend *b) {
    b->attention_state_floats = cuda_attention_state_floats;
    b->attention_forward = cu_attention_forward, b->attention_backward = cu_attention_backward;
}
