// attention_tc.cu: flash-style causal GQA attention on tensor cores (WMMA bf16 16x16x16, fp32 accumulation),
// the "cuda" table's attention. Same contract and saved state as attention_cuda.cu (lse, then delta, each
// B x H x T), which stays the fp32 table's and the reference these kernels are tested against.
// q, k, v, out and the gradients are fp32 in memory; tiles are rounded to bf16 as they enter shared memory.
// The head dimension is padded with zeros to a multiple of 16 (NK = padded / 16 <= 8).
//   forward: a block = 4 warps x 16 query rows; key tiles of 64; S = Q K^T on tensor cores into shared
//            memory, online softmax per row in fp32, P in bf16, O (fp32, shared memory) rescaled and += P V.
//   dq:      the same blocks; per key tile P = exp(S - lse), dP = dO V^T, dS = P (dP - delta) scale,
//            dq += dS K with the accumulators in registers.
//   dk, dv:  a block = 4 warps x 16 key rows; over the group's query heads and the query tiles at or after
//            the block's first key: S^T = K Q^T, dP^T = V dO^T, dv += P^T dO, dk += dS^T Q.
// Deterministic: every output element has one writer; sums run in a fixed order.
#include <mma.h>

#include "cuda_common.cuh"

using namespace nvcuda;

#define BQ 64 // rows (queries or keys) per block: 4 warps x 16
#define BT 64 // columns per tile (keys or queries)
#define FULL 0xffffffffu

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c;

// rows [r0, r0 + n) of a (B,T,heads,hd) tensor at head h into a (n x DP) bf16 tile, zero padded
__device__ void load_tile(bf16 *dst, const float *src, int b, int r0, int n, int T, int heads, int h, int hd, int DP) {
    for (int i = threadIdx.x; i < n * DP; i += blockDim.x) {
        int r = i / DP, d = i % DP, t = r0 + r;
        float x = t < T && d < hd ? src[(((size_t)b * T + t) * heads + h) * hd + d] : 0.f;
        dst[i] = __float2bfloat16_rn(x);
    }
}

// dst rows [r0, r0 + 16) of a (B,T,heads,hd) tensor at head h += the warp's staged 16 x DP rows
__device__ void add_rows(float *dst, const float *stage, int b, int r0, int T, int heads, int h, int hd, int DP) {
    for (int i = threadIdx.x % 32; i < 16 * hd; i += 32) {
        int r = i / hd, d = i % hd, t = r0 + r;
        if (t < T) dst[(((size_t)b * T + t) * heads + h) * hd + d] += stage[r * DP + d];
    }
}

// C(16 x 16*NC) = A(16 x 16*NKK) B, A row-major (lda), B as given; written row-major into C (ldc, fp32)
template <int NKK, int NC, typename FB>
__device__ void mma_rows(float *C, int ldc, const bf16 *A, int lda, const bf16 *B, int b_col_stride, int b_k_stride,
                         int ldb) {
    for (int n = 0; n < NC; n++) {
        frag_c acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < NKK; kk++) {
            frag_a a;
            FB bf;
            wmma::load_matrix_sync(a, A + kk * 16, lda);
            wmma::load_matrix_sync(bf, B + n * b_col_stride + kk * b_k_stride, ldb);
            wmma::mma_sync(acc, a, bf, acc);
        }
        wmma::store_matrix_sync(C + n * 16, acc, ldc, wmma::mem_row_major);
    }
}

// ---------------------------------------------------------------- forward

template <int NK>
__global__ void k_attn_fwd_tc(float *out, float *lse, const float *q, const float *k, const float *v, int T, int H,
                              int KV, int hd, float scale) {
    constexpr int DP = 16 * NK;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Qs = (bf16 *)smem, *Ks = Qs + BQ * DP, *Vs = Ks + BT * DP;
    float *Ss = (float *)(Vs + BT * DP);
    bf16 *Ps = (bf16 *)(Ss + BQ * BT);
    float *Os = (float *)(Ps + BQ * BT), *Ms = Os + BQ * DP, *Ls = Ms + BQ;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / KV);
    const int t0 = (gridDim.x - 1 - blockIdx.x) * BQ, t_last = min(T - 1, t0 + BQ - 1), w0 = t0 + warp * 16;
    load_tile(Qs, q, b, t0, BQ, T, H, h, hd, DP);
    for (int i = threadIdx.x; i < BQ * DP; i += blockDim.x) Os[i] = 0;
    for (int i = threadIdx.x; i < BQ; i += blockDim.x) Ms[i] = -INFINITY, Ls[i] = 0;
    float *S = Ss + warp * 16 * BT, *O = Os + warp * 16 * DP;
    bf16 *P = Ps + warp * 16 * BT;
    const int r = lane / 2, c0 = (lane % 2) * (BT / 2), t = w0 + r; // this lane's row and half of the columns
    for (int s0 = 0; s0 <= t_last; s0 += BT) {
        __syncthreads(); // the previous tile is consumed (and Q, O, M, L are ready on the first)
        load_tile(Ks, k, b, s0, BT, T, KV, kh, hd, DP);
        load_tile(Vs, v, b, s0, BT, T, KV, kh, hd, DP);
        __syncthreads();
        if (w0 > t_last || s0 > w0 + 15) continue; // warp-uniform: nothing of this tile reaches these rows
        mma_rows<NK, BT / 16, frag_b_col>(S, BT, Qs + warp * 16 * DP, DP, Ks, 16 * DP, 16, DP); // S = Q K^T
        __syncwarp();
        float mx = -INFINITY;
        for (int j = 0; j < BT / 2; j++) {
            const int c = c0 + (j + lane) % (BT / 2); // staggered: the lanes of a warp hit 32 different banks
            float x = s0 + c <= t && t < T ? S[r * BT + c] * scale : -INFINITY;
            S[r * BT + c] = x;
            mx = fmaxf(mx, x);
        }
        mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 1));
        const float m_old = Ms[warp * 16 + r], m_new = fmaxf(m_old, mx);
        float sum = 0;
        for (int j = 0; j < BT / 2; j++) {
            const int c = c0 + (j + lane) % (BT / 2); // staggered: the lanes of a warp hit 32 different banks
            float p = m_new == -INFINITY ? 0.f : expf(S[r * BT + c] - m_new);
            P[r * BT + c] = __float2bfloat16_rn(p);
            sum += __bfloat162float(P[r * BT + c]); // the sum of what the P V product will see
        }
        sum += __shfl_xor_sync(FULL, sum, 1);
        const float corr = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
        for (int j = 0; j < DP / 2; j++) O[r * DP + (lane % 2) * (DP / 2) + (j + lane) % (DP / 2)] *= corr;
        __syncwarp();
        if (lane % 2 == 0) Ms[warp * 16 + r] = m_new, Ls[warp * 16 + r] = Ls[warp * 16 + r] * corr + sum;
        for (int n = 0; n < NK; n++) { // O += P V
            frag_c acc;
            wmma::load_matrix_sync(acc, O + n * 16, DP, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < BT / 16; kk++) {
                frag_a a;
                frag_b_row bv;
                wmma::load_matrix_sync(a, P + kk * 16, BT);
                wmma::load_matrix_sync(bv, Vs + kk * 16 * DP + n * 16, DP);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(O + n * 16, acc, DP, wmma::mem_row_major);
        }
        __syncwarp();
    }
    __syncthreads();
    for (int i = lane; i < 16 * hd; i += 32) {
        int rr = i / hd, d = i % hd, tt = w0 + rr;
        if (tt < T) out[(((size_t)b * T + tt) * H + h) * hd + d] = O[rr * DP + d] / Ls[warp * 16 + rr];
    }
    if (lane < 16 && w0 + lane < T)
        lse[((size_t)b * H + h) * T + w0 + lane] = Ms[warp * 16 + lane] + logf(Ls[warp * 16 + lane]);
}

// ---------------------------------------------------------------- dq

template <int NK>
__global__ void k_attn_dq_tc(float *dq, const float *dout, const float *lse, const float *delta, const float *q,
                             const float *k, const float *v, int T, int H, int KV, int hd, float scale) {
    constexpr int DP = 16 * NK;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Qs = (bf16 *)smem, *Gs = Qs + BQ * DP, *Ks = Gs + BQ * DP, *Vs = Ks + BT * DP;
    float *Ss = (float *)(Vs + BT * DP), *Dps = Ss + BQ * BT; // per warp 16 x BT each
    bf16 *DSs = (bf16 *)(Dps + BQ * BT);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / KV);
    const int t0 = (gridDim.x - 1 - blockIdx.x) * BQ, t_last = min(T - 1, t0 + BQ - 1), w0 = t0 + warp * 16;
    load_tile(Qs, q, b, t0, BQ, T, H, h, hd, DP);
    load_tile(Gs, dout, b, t0, BQ, T, H, h, hd, DP);
    float *S = Ss + warp * 16 * BT, *Dp = Dps + warp * 16 * BT;
    bf16 *DS = DSs + warp * 16 * BT;
    const int r = lane / 2, c0 = (lane % 2) * (BT / 2), t = w0 + r;
    const size_t row = ((size_t)b * H + h) * T + t;
    const float L = t < T ? lse[row] : 0.f, D = t < T ? delta[row] : 0.f;
    frag_c acc[NK];
#pragma unroll
    for (int n = 0; n < NK; n++) wmma::fill_fragment(acc[n], 0.f);
    for (int s0 = 0; s0 <= t_last; s0 += BT) {
        __syncthreads();
        load_tile(Ks, k, b, s0, BT, T, KV, kh, hd, DP);
        load_tile(Vs, v, b, s0, BT, T, KV, kh, hd, DP);
        __syncthreads();
        if (w0 > t_last || s0 > w0 + 15) continue;
        mma_rows<NK, BT / 16, frag_b_col>(S, BT, Qs + warp * 16 * DP, DP, Ks, 16 * DP, 16, DP);  // Q K^T
        mma_rows<NK, BT / 16, frag_b_col>(Dp, BT, Gs + warp * 16 * DP, DP, Vs, 16 * DP, 16, DP); // dO V^T
        __syncwarp();
        for (int j = 0; j < BT / 2; j++) {
            const int c = c0 + (j + lane) % (BT / 2); // staggered: the lanes of a warp hit 32 different banks
            float ds = 0;
            if (s0 + c <= t && t < T) {
                float p = expf(S[r * BT + c] * scale - L);
                ds = p * (Dp[r * BT + c] - D) * scale;
            }
            DS[r * BT + c] = __float2bfloat16_rn(ds);
        }
        __syncwarp();
#pragma unroll
        for (int n = 0; n < NK; n++) // dq += dS K
#pragma unroll
            for (int kk = 0; kk < BT / 16; kk++) {
                frag_a a;
                frag_b_row bk;
                wmma::load_matrix_sync(a, DS + kk * 16, BT);
                wmma::load_matrix_sync(bk, Ks + kk * 16 * DP + n * 16, DP);
                wmma::mma_sync(acc[n], a, bk, acc[n]);
            }
    }
    __syncthreads();
    float *stage = Ss + warp * 16 * DP; // S and dP together (2 BQ BT floats) hold 4 warps x 16 x DP
#pragma unroll
    for (int n = 0; n < NK; n++) wmma::store_matrix_sync(stage + n * 16, acc[n], DP, wmma::mem_row_major);
    __syncwarp();
    add_rows(dq, stage, b, w0, T, H, h, hd, DP);
}

// ---------------------------------------------------------------- dk, dv

template <int NK>
__global__ void k_attn_dkv_tc(float *dk, float *dv, const float *dout, const float *lse, const float *delta,
                              const float *q, const float *k, const float *v, int T, int H, int KV, int hd,
                              float scale) {
    constexpr int DP = 16 * NK;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Ks = (bf16 *)smem, *Vs = Ks + BQ * DP, *Qs = Vs + BQ * DP, *Gs = Qs + BT * DP;
    float *Ss = (float *)(Gs + BT * DP), *Dps = Ss + BQ * BT, *Lq = Dps + BQ * BT, *Dq = Lq + BT;
    bf16 *Ps = (bf16 *)(Dq + BT), *DSs = Ps + BQ * BT;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kh = blockIdx.y, b = blockIdx.z, group = H / KV;
    const int s_first = blockIdx.x * BQ, w0 = s_first + warp * 16; // the first keys have the most queries
    load_tile(Ks, k, b, s_first, BQ, T, KV, kh, hd, DP);
    load_tile(Vs, v, b, s_first, BQ, T, KV, kh, hd, DP);
    float *S = Ss + warp * 16 * BT, *Dp = Dps + warp * 16 * BT;
    bf16 *P = Ps + warp * 16 * BT, *DS = DSs + warp * 16 * BT;
    const int r = lane / 2, c0 = (lane % 2) * (BT / 2), s = w0 + r; // this lane's key row, half the queries
    frag_c acck[NK], accv[NK];
#pragma unroll
    for (int n = 0; n < NK; n++) wmma::fill_fragment(acck[n], 0.f), wmma::fill_fragment(accv[n], 0.f);
    for (int h = kh * group; h < (kh + 1) * group; h++)
        for (int q0 = s_first; q0 < T; q0 += BT) {
            __syncthreads();
            load_tile(Qs, q, b, q0, BT, T, H, h, hd, DP);
            load_tile(Gs, dout, b, q0, BT, T, H, h, hd, DP);
            for (int i = threadIdx.x; i < BT; i += blockDim.x) {
                size_t row = ((size_t)b * H + h) * T + q0 + i;
                Lq[i] = q0 + i < T ? lse[row] : 0.f;
                Dq[i] = q0 + i < T ? delta[row] : 0.f;
            }
            __syncthreads();
            if (w0 >= T) continue; // warp-uniform: no keys in this warp (every tile has a query >= w0)
            mma_rows<NK, BT / 16, frag_b_col>(S, BT, Ks + warp * 16 * DP, DP, Qs, 16 * DP, 16, DP);  // K Q^T
            mma_rows<NK, BT / 16, frag_b_col>(Dp, BT, Vs + warp * 16 * DP, DP, Gs, 16 * DP, 16, DP); // V dO^T
            __syncwarp();
            for (int j = 0; j < BT / 2; j++) {
            const int c = c0 + (j + lane) % (BT / 2); // staggered: the lanes of a warp hit 32 different banks
                const int tq = q0 + c;
                float p = 0, ds = 0;
                if (tq < T && tq >= s && s < T) {
                    p = expf(S[r * BT + c] * scale - Lq[c]);
                    ds = p * (Dp[r * BT + c] - Dq[c]) * scale;
                }
                P[r * BT + c] = __float2bfloat16_rn(p);
                DS[r * BT + c] = __float2bfloat16_rn(ds);
            }
            __syncwarp();
#pragma unroll
            for (int n = 0; n < NK; n++)
#pragma unroll
                for (int kk = 0; kk < BT / 16; kk++) {
                    frag_a a;
                    frag_b_row bg;
                    wmma::load_matrix_sync(a, P + kk * 16, BT); // dv += P^T dO
                    wmma::load_matrix_sync(bg, Gs + kk * 16 * DP + n * 16, DP);
                    wmma::mma_sync(accv[n], a, bg, accv[n]);
                    wmma::load_matrix_sync(a, DS + kk * 16, BT); // dk += dS^T Q
                    wmma::load_matrix_sync(bg, Qs + kk * 16 * DP + n * 16, DP);
                    wmma::mma_sync(acck[n], a, bg, acck[n]);
                }
        }
    __syncthreads();
    float *stage = Ss + warp * 16 * DP; // S and dP together (2 BQ BT floats) hold 4 warps x 16 x DP
#pragma unroll
    for (int n = 0; n < NK; n++) wmma::store_matrix_sync(stage + n * 16, acck[n], DP, wmma::mem_row_major);
    __syncwarp();
    add_rows(dk, stage, b, w0, T, KV, kh, hd, DP);
    __syncwarp();
#pragma unroll
    for (int n = 0; n < NK; n++) wmma::store_matrix_sync(stage + n * 16, accv[n], DP, wmma::mem_row_major);
    __syncwarp();
    add_rows(dv, stage, b, w0, T, KV, kh, hd, DP);
}

// ---------------------------------------------------------------- launch

static size_t smem_fwd(int DP) {
    return sizeof(bf16) * (BQ * DP + 2 * BT * DP + BQ * BT) + sizeof(float) * (BQ * BT + BQ * DP + 2 * BQ);
}
static size_t smem_dq(int DP) {
    return sizeof(bf16) * (2 * BQ * DP + 2 * BT * DP + BQ * BT) + sizeof(float) * 2 * BQ * BT;
}
static size_t smem_dkv(int DP) {
    return sizeof(bf16) * (2 * BQ * DP + 2 * BT * DP + 2 * BQ * BT) + sizeof(float) * (2 * BQ * BT + 2 * BT);
}

template <int NK>
static void fwd(float *out, float *att, const float *q, const float *k, const float *v, int B, int T, int H, int KV,
                int hd, float scale) {
    const size_t sm = smem_fwd(16 * NK);
    static bool opted_in; // once per head size, not at every launch
    if (!opted_in)
        CK("attention_forward", cudaFuncSetAttribute(k_attn_fwd_tc<NK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
    opted_in = true;
    dim3 grid((T + BQ - 1) / BQ, H, B);
    LAUNCH_SMEM("attention_forward", grid, 128, sm, k_attn_fwd_tc<NK>, out, att, q, k, v, T, H, KV, hd, scale);
}
template <int NK>
static void bwd(float *dq, float *dk, float *dv, const float *dout, const float *lse, const float *delta,
                const float *q, const float *k, const float *v, int B, int T, int H, int KV, int hd, float scale) {
    const size_t sq = smem_dq(16 * NK), skv = smem_dkv(16 * NK);
    static bool opted_in;
    if (!opted_in) {
        CK("attention_backward", cudaFuncSetAttribute(k_attn_dq_tc<NK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sq));
        CK("attention_backward", cudaFuncSetAttribute(k_attn_dkv_tc<NK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)skv));
    }
    opted_in = true;
    dim3 gq((T + BQ - 1) / BQ, H, B), gkv((T + BQ - 1) / BQ, KV, B);
    LAUNCH_SMEM("attention_backward", gq, 128, sq, k_attn_dq_tc<NK>, dq, dout, lse, delta, q, k, v, T, H, KV, hd, scale);
    LAUNCH_SMEM("attention_backward", gkv, 128, skv, k_attn_dkv_tc<NK>, dk, dv, dout, lse, delta, q, k, v, T, H, KV, hd,
                scale);
}

#define DISPATCH_NK(hd, CALL)                                                                              \
    switch (((hd) + 15) / 16) {                                                                            \
    case 1: CALL(1); break;                                                                                \
    case 2: CALL(2); break;                                                                                \
    case 3: CALL(3); break;                                                                                \
    case 4: CALL(4); break;                                                                                \
    case 5: CALL(5); break;                                                                                \
    case 6: CALL(6); break;                                                                                \
    case 7: CALL(7); break;                                                                                \
    case 8: CALL(8); break;                                                                                \
    default: ml_cuda_die("attention", "head dimension outside 1..128");                                    \
    }

void ml_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int H, int hd); // attention_cuda.cu

static void tc_attention_forward(float *out, float *att, const float *q, const float *k, const float *v, int B, int T,
                                 int H, int KV, int hd) {
    PROF("attention_forward");
    if (KV <= 0 || H % KV) ml_cuda_die("attention_forward", "heads not a multiple of kv_heads");
    const float scale = (float)(1.0 / sqrt((double)hd));
#define CALL(nk) fwd<nk>(out, att, q, k, v, B, T, H, KV, hd, scale)
    DISPATCH_NK(hd, CALL)
#undef CALL
}
static void tc_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, float *att,
                                  const float *q, const float *k, const float *v, int B, int T, int H, int KV,
                                  int hd) {
    PROF("attention_backward");
    if (KV <= 0 || H % KV) ml_cuda_die("attention_backward", "heads not a multiple of kv_heads");
    const float scale = (float)(1.0 / sqrt((double)hd));
    float *delta = att + (size_t)B * H * T;
    ml_attention_delta(delta, dout, out, B, T, H, hd);
#define CALL(nk) bwd<nk>(dq, dk, dv, dout, att, delta, q, k, v, B, T, H, KV, hd, scale)
    DISPATCH_NK(hd, CALL)
#undef CALL
}

void ml_cuda_fill_attention_tc(ml_backend *b) {
    b->attention_forward = tc_attention_forward, b->attention_backward = tc_attention_backward;
}
