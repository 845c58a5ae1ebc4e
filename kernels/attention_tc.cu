// attention_tc.cu: flash-style causal GQA attention on tensor cores, the "cuda" table's attention (FlashAttention-2
// structure: the score tile, the softmax and the accumulators live in registers). Same contract and saved state
// as attention_cuda.cu (lse, then delta, each B x H x T), which stays the fp32 table's and the reference these
// kernels are tested against. q, k, v, out and the gradients are fp32 in memory; a staging pass rounds q, k, v
// (and dO) to bf16 into the workspace as (B, heads, Tp, DP) tensors, zero padded to Tp = T rounded up to 64
// rows and DP = hd rounded up to 16 columns (NK = DP / 16 <= 8), so every 64-row tile is one contiguous block
// that cp.async copies 16 bytes at a time, double-buffered (the next tile is in flight while this one is
// used); fragments come out of shared memory with ldmatrix (.trans for operands read down their columns);
// products accumulate in fp32 (mma.sync m16n8k16, bf16 inputs).
//   forward: a block = 4 warps x 16 query rows; key tiles of 64; per warp S = Q K^T (16 x 64) in registers,
//            online softmax (exp2, fp32), P rounded to bf16 straight from the accumulator layout into the
//            A-operand layout, O += P V in registers.
//   dk, dv:  a block = 4 warps x 16 key rows; over the group's query heads and the query tiles at or after
//            the block's first key: S^T = K Q^T, dP^T = V dO^T, dS^T = P^T (dP^T - delta) scale, dv += P^T dO,
//            dk += dS^T Q; dS^T is also written in bf16 (zeros where every query precedes the block's keys).
//   dq:      dq += dS K as batched cuBLAS GEMMs over that dS (bf16 inputs, fp32 accumulation) instead of a
//            second kernel recomputing S and dP (no atomics, unlike FlashAttention-2's dq): one pointer-array
//            batch over every (sequence, query head) per band of queries, in up to 4 bands, each over the keys
//            up to its last query (62.5% of the full T x T, where the causal part is 50%; the rest multiplies
//            zeros above the diagonal, at cuBLAS speed). dS takes B x heads x Tp^2 bf16: the backward runs
//            chunks of kv heads, or of sequences for one kv head, sized by ML_ATTN_DS_BYTES and a floor of
//            blocks per chunk (plan_ds).
// Deterministic: every output element has one writer; sums run in a fixed order.
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4): A 16 x 16 row-major, registers
// {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B 16 x 8, registers {(2t..2t+1, g), (2t+8.., g)};
// C 16 x 8 fp32 {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}. Two adjacent C tiles (16 x 16) are one A tile.
#include "cuda_common.cuh"
#include "mma_sm80.cuh"

#define BQ 64  // rows (queries or keys) per block: 4 warps x 16
#define BT 64  // rows per tile (keys or queries), and Tp's granule
#define NT 128 // threads per block
static_assert(BQ == BT, "a block's rows are one tile of the staged layout");
#define FULL 0xffffffffu
#define LOG2E 1.4426950408889634f

// shared-memory tiles: 64 rows of DP bf16, rows padded by 8 elements (16 bytes) so that the 8 row addresses of
// an ldmatrix phase fall on distinct banks
template <int NK> struct tile {
    static constexpr int DP = 16 * NK, LD = DP + 8, ELEMS = BT * LD;
};

// rows [0, 64) of a staged (Tp x DP) matrix, src at the tile's first row, into a shared tile: NK 16-byte
// copies per thread, asynchronous
template <int NK> __device__ __forceinline__ void tile_async(bf16 *dst, const bf16 *src) {
    constexpr int DP = tile<NK>::DP, LD = tile<NK>::LD, C = DP / 8; // 16-byte chunks per row
#pragma unroll
    for (int j = 0; j < NK; j++) { // 64 C / NT = NK
        const int i = threadIdx.x + j * NT, r = i / C, c = i % C * 8;
        cp_async16(dst + r * LD + c, src + (size_t)r * DP + c);
    }
}

// the A fragment of rows [0, 16) x columns [16 kk, 16 kk + 16) of a row-major shared tile
template <int NK> __device__ __forceinline__ void frag_a(uint32_t a[4], const bf16 *rows, int kk) {
    const int l = threadIdx.x % 32;
    ldsm_x4<false>(a, rows + (l % 16) * tile<NK>::LD + kk * 16 + l / 16 * 8);
}
// B fragments of B(k, n) = rows[n][k] for k in [16 kk, 16 kk + 16): b[0..1] for n in [n0, n0 + 8), b[2..3] for
// [n0 + 8, n0 + 16) (e.g. K for S = Q K^T)
template <int NK> __device__ __forceinline__ void frag_b_rows(uint32_t b[4], const bf16 *rows, int n0, int kk) {
    const int l = threadIdx.x % 32;
    ldsm_x4<false>(b, rows + (n0 + l % 8 + l / 16 * 8) * tile<NK>::LD + kk * 16 + l / 8 % 2 * 8);
}
// B fragments of B(k, n) = t[k][n] for k in [16 kk, 16 kk + 16), read down the columns: b[0..1] for n in
// [n0, n0 + 8), b[2..3] for [n0 + 8, n0 + 16) (e.g. V for O += P V)
template <int NK> __device__ __forceinline__ void frag_b_cols(uint32_t b[4], const bf16 *t, int kk, int n0) {
    const int l = threadIdx.x % 32;
    ldsm_x4<true>(b, t + (kk * 16 + l % 8 + l / 8 % 2 * 8) * tile<NK>::LD + n0 + l / 16 * 8);
}
// C(16 x 64) = A(16 x DP, fragments a) B, B(k, n) = rows[n][k] of a shared tile: the 64 rows' products with
// the A rows, e.g. S = Q K^T with rows = the key tile
template <int NK> __device__ __forceinline__ void mma_rows64(float c[8][4], const uint32_t a[NK][4], const bf16 *rows) {
#pragma unroll
    for (int n = 0; n < 8; n++) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
#pragma unroll
    for (int n2 = 0; n2 < 4; n2++)
#pragma unroll
        for (int kk = 0; kk < NK; kk++) {
            uint32_t b[4];
            frag_b_rows<NK>(b, rows, 16 * n2, kk);
            mma16816(c[2 * n2], a[kk], b[0], b[1]);
            mma16816(c[2 * n2 + 1], a[kk], b[2], b[3]);
        }
}
// acc(16 x DP) += P(16 x 64, C layout in c, rounded to bf16 here) B, B(k, n) = t[k][n] of a shared tile,
// e.g. O += P V with t = the value tile
template <int NK> __device__ __forceinline__ void mma_p_cols(float acc[2 * NK][4], const float c[8][4], const bf16 *t) {
#pragma unroll
    for (int kk = 0; kk < BT / 16; kk++) {
        const uint32_t a[4] = {ml_bf16x2(c[2 * kk][0], c[2 * kk][1]), ml_bf16x2(c[2 * kk][2], c[2 * kk][3]),
                               ml_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]), ml_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3])};
#pragma unroll
        for (int n2 = 0; n2 < NK; n2++) {
            uint32_t b[4];
            frag_b_cols<NK>(b, t, kk, 16 * n2);
            mma16816(acc[2 * n2], a, b[0], b[1]);
            mma16816(acc[2 * n2 + 1], a, b[2], b[3]);
        }
    }
}
// dst rows [r0, r0 + 16) of a (B,T,heads,hd) tensor at head h += this warp's accumulators (16 x DP)
template <int NK>
__device__ void add_rows(float *dst, const float acc[2 * NK][4], int b, int r0, int T, int heads, int h, int hd) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int tt = r0 + g + 8 * half;
        if (tt >= T) continue;
        float *row = dst + (((size_t)b * T + tt) * heads + h) * hd;
#pragma unroll
        for (int n = 0; n < 2 * NK; n++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int d = n * 8 + 2 * t + j;
                if (d < hd) row[d] += acc[n][2 * half + j];
            }
    }
}

// ---------------------------------------------------------------- staging

// src (B, T, heads, hd) fp32 -> dst (B, heads, Tp, DP) bf16, zeros past T and hd; 8 elements (16 bytes) a thread
__global__ void k_attn_stage(bf16 *dst, const float *src, int B, int T, int Tp, int heads, int hd, int DP) {
    const size_t n8 = (size_t)B * heads * Tp * DP / 8;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i * 8, r = e / DP, bh = r / Tp;
        const int d = (int)(e % DP), t = (int)(r % Tp), h = (int)(bh % heads), b = (int)(bh / heads);
        const float *s = src + (((size_t)b * T + t) * heads + h) * hd;
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int d0 = d + 2 * j;
            w[j] = ml_bf16x2(t < T && d0 < hd ? s[d0] : 0.f, t < T && d0 + 1 < hd ? s[d0 + 1] : 0.f);
        }
        *(uint4 *)&dst[e] = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// ---------------------------------------------------------------- forward

template <int NK>
__global__ void __launch_bounds__(NT) k_attn_fwd_tc(float *out, float *lse, const bf16 *qs, const bf16 *ks,
                                                    const bf16 *vs, int T, int Tp, int H, int KV, int hd, float scale) {
    constexpr int DP = tile<NK>::DP, LD = tile<NK>::LD, TE = tile<NK>::ELEMS;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Qs = (bf16 *)smem, *Kb = Qs + TE, *Vb = Kb + 2 * TE; // K and V double-buffered
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // the query tile is the grid's slowest index, last tile (most keys) first: the longest blocks start first
    const int h = blockIdx.x, b = blockIdx.y, kh = h / (H / KV);
    const int t0 = (gridDim.z - 1 - blockIdx.z) * BQ, w0 = t0 + warp * 16, ntiles = t0 / BT + 1;
    const bf16 *kbase = ks + ((size_t)b * KV + kh) * Tp * DP, *vbase = vs + ((size_t)b * KV + kh) * Tp * DP;
    const float sl2 = scale * LOG2E; // scores in log2 units: exp2 is one instruction
    tile_async<NK>(Qs, qs + (((size_t)b * H + h) * Tp + t0) * DP);
    tile_async<NK>(Kb, kbase), tile_async<NK>(Vb, vbase);
    cp_async_commit();
    uint32_t qa[NK][4];
    float o[2 * NK][4];
#pragma unroll
    for (int n = 0; n < 2 * NK; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}; // rows g and g + 8; l: this thread's columns only
    for (int j = 0; j < ntiles; j++) {
        const int s0 = j * BT, cur = j & 1;
        if (j + 1 < ntiles) { // the next tile into the other buffer (its readers passed the barrier below)
            tile_async<NK>(Kb + (cur ^ 1) * TE, kbase + (size_t)(s0 + BT) * DP);
            tile_async<NK>(Vb + (cur ^ 1) * TE, vbase + (size_t)(s0 + BT) * DP);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); // tile j (and Q) landed, every thread's share
        if (j == 0)
#pragma unroll
            for (int kk = 0; kk < NK; kk++) frag_a<NK>(qa[kk], Qs + warp * 16 * LD, kk);
        if (s0 <= w0 + 15) { // warp-uniform: some key of this tile is at or before this warp's last row
            const bf16 *Ks = Kb + cur * TE, *Vs = Vb + cur * TE;
            float s[8][4];
            mma_rows64<NK>(s, qa, Ks);
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int key = s0 + n * 8 + 2 * t + (i & 1), row = w0 + g + 8 * (i >> 1);
                    s[n][i] = key <= row && row < T ? s[n][i] * sl2 : -INFINITY;
                    mx[i >> 1] = fmaxf(mx[i >> 1], s[n][i]);
                }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 2));
            }
#pragma unroll
            for (int r = 0; r < 2; r++) { // rescale what was summed under the old maximum
                const float m_new = fmaxf(m[r], mx[r]), corr = m[r] == -INFINITY ? 0.f : exp2f(m[r] - m_new);
                m[r] = m_new, l[r] *= corr;
#pragma unroll
                for (int n = 0; n < 2 * NK; n++) o[n][2 * r] *= corr, o[n][2 * r + 1] *= corr;
            }
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const float mr = m[i >> 1], p = mr == -INFINITY ? 0.f : exp2f(s[n][i] - mr);
                    s[n][i] = p;
                    l[i >> 1] += __bfloat162float(__float2bfloat16_rn(p)); // the sum of what the P V product sees
                }
            mma_p_cols<NK>(o, s, Vs);
        }
        __syncthreads(); // tile j consumed: the next iteration refills its buffer
    }
#pragma unroll
    for (int r = 0; r < 2; r++) l[r] += __shfl_xor_sync(FULL, l[r], 1), l[r] += __shfl_xor_sync(FULL, l[r], 2);
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int tt = w0 + g + 8 * half;
        if (tt >= T) continue;
        float *row = out + (((size_t)b * T + tt) * H + h) * hd;
        const float inv = 1.f / l[half];
#pragma unroll
        for (int n = 0; n < 2 * NK; n++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int d = n * 8 + 2 * t + j;
                if (d < hd) row[d] = o[n][2 * half + j] * inv;
            }
        if (t == 0) lse[((size_t)b * H + h) * T + tt] = (m[half] + log2f(l[half])) * 0.6931471805599453f;
    }
}

// ---------------------------------------------------------------- dk, dv

template <int NK>
__global__ void __launch_bounds__(NT) k_attn_dkv_tc(float *dk, float *dv, bf16 *dst, const float *lse,
                                                    const float *delta, const bf16 *qs, const bf16 *gs,
                                                    const bf16 *ks, const bf16 *vs, int T, int Tp, int H, int KV,
                                                    int b0, int kh0, int hd, float scale) {
    constexpr int DP = tile<NK>::DP, LD = tile<NK>::LD, TE = tile<NK>::ELEMS;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Ks = (bf16 *)smem, *Vs = Ks + TE, *Qb = Vs + TE, *Gb = Qb + 2 * TE; // Q and dO double-buffered
    float *Lb = (float *)(Gb + 2 * TE), *Db = Lb + 2 * BT;                      // lse (log2 units), delta
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // dst holds dS^T of the chunk's kv heads [kh0, kh0 + gridDim.x) x sequences [b0, b0 + gridDim.y); the key
    // tile is the grid's slowest index, first tile (most queries) first: the longest blocks start first
    const int kl = blockIdx.x, bl = blockIdx.y, kh = kh0 + kl, b = b0 + bl, group = H / KV;
    const int HC = gridDim.x * group; // query heads in dst
    const int s_first = blockIdx.z * BQ, w0 = s_first + warp * 16;
    const int nq = (T - 1) / BT - (int)blockIdx.z + 1, iters = group * nq; // query tiles per head; in all
    const float sl2 = scale * LOG2E;
    // iteration i: query head kh group + i / nq, query tile s_first + 64 (i % nq), into buffer i & 1
    auto issue = [&](int i) {
        const int h = kh * group + i / nq, q0 = s_first + i % nq * BT, buf = i & 1;
        const size_t off = (((size_t)b * H + h) * Tp + q0) * DP;
        tile_async<NK>(Qb + buf * TE, qs + off), tile_async<NK>(Gb + buf * TE, gs + off);
        for (int r = threadIdx.x; r < BT; r += NT) { // plain loads: visible after the barrier that publishes the tile
            const size_t row = ((size_t)b * H + h) * T + q0 + r;
            Lb[buf * BT + r] = q0 + r < T ? lse[row] * LOG2E : 0.f;
            Db[buf * BT + r] = q0 + r < T ? delta[row] : 0.f;
        }
    };
    tile_async<NK>(Ks, ks + (((size_t)b * KV + kh) * Tp + s_first) * DP);
    tile_async<NK>(Vs, vs + (((size_t)b * KV + kh) * Tp + s_first) * DP);
    issue(0);
    cp_async_commit();
    float ak[2 * NK][4], av[2 * NK][4];
#pragma unroll
    for (int n = 0; n < 2 * NK; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) ak[n][i] = av[n][i] = 0.f;
    for (int it = 0; it < iters; it++) {
        const int q0 = s_first + it % nq * BT, cur = it & 1;
        if (it + 1 < iters) {
            issue(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (w0 < T) { // warp-uniform: this warp has keys (every tile reaches them: q0 <= w0)
            const bf16 *Qs = Qb + cur * TE, *Gs = Gb + cur * TE;
            const float *Lq = Lb + cur * BT, *Dq = Db + cur * BT;
            uint32_t a[NK][4];
            float s[8][4], dp[8][4];
#pragma unroll
            for (int kk = 0; kk < NK; kk++) frag_a<NK>(a[kk], Ks + warp * 16 * LD, kk);
            mma_rows64<NK>(s, a, Qs); // S^T = K Q^T
#pragma unroll
            for (int kk = 0; kk < NK; kk++) frag_a<NK>(a[kk], Vs + warp * 16 * LD, kk);
            mma_rows64<NK>(dp, a, Gs); // dP^T = V dO^T
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int c = n * 8 + 2 * t + (i & 1), tq = q0 + c, key = w0 + g + 8 * (i >> 1);
                    const float p = tq < T && tq >= key && key < T ? exp2f(s[n][i] * sl2 - Lq[c]) : 0.f;
                    s[n][i] = p, dp[n][i] = p * (dp[n][i] - Dq[c]) * scale;
                }
            // dS^T in bf16 for dq = dS K (a GEMM after this kernel): rows = keys, columns = queries
            bf16 *ds_rows = dst + (((size_t)bl * HC + kl * group + it / nq) * Tp + w0 + g) * Tp + q0 + 2 * t;
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int half = 0; half < 2; half++)
                    *(uint32_t *)&ds_rows[(size_t)8 * half * Tp + n * 8] = ml_bf16x2(dp[n][2 * half], dp[n][2 * half + 1]);
            mma_p_cols<NK>(av, s, Gs);  // dv += P^T dO
            mma_p_cols<NK>(ak, dp, Qs); // dk += dS^T Q
        }
        __syncthreads();
    }
    add_rows<NK>(dk, ak, b, w0, T, KV, kh, hd);
    add_rows<NK>(dv, av, b, w0, T, KV, kh, hd);
    // dS^T is zero where every query precedes these keys (query tiles before s_first), which the loop skips
    const int c16 = s_first / 8; // 16-byte chunks per row
    for (int h = 0; h < group; h++) {
        bf16 *rows = dst + (((size_t)bl * HC + kl * group + h) * Tp + s_first) * Tp;
        for (int i = threadIdx.x; i < BQ * c16; i += NT)
            *(uint4 *)&rows[(size_t)(i / c16) * Tp + i % c16 * 8] = make_uint4(0, 0, 0, 0);
    }
}

// ---------------------------------------------------------------- launch

static int padded_T(int T) { return (T + BT - 1) / BT * BT; }
static int padded_D(int hd) { return (hd + 15) / 16 * 16; }
// the staged copies in workspace slot WS_ATTN: q | dO | k | v, each (B, heads, Tp, DP) bf16
size_t ml_attention_stage_bytes(int B, int T, int H, int KV, int hd) {
    return sizeof(bf16) * (size_t)B * padded_T(T) * padded_D(hd) * (2 * H + 2 * KV);
}
struct staged {
    bf16 *q, *g, *k, *v;
};
static staged stage_ptrs(int B, int T, int H, int KV, int hd) {
    const size_t per_head = (size_t)B * padded_T(T) * padded_D(hd);
    bf16 *p = (bf16 *)ml_ws(WS_ATTN, ml_attention_stage_bytes(B, T, H, KV, hd));
    return staged{p, p + per_head * H, p + per_head * 2 * H, p + per_head * (2 * H + KV)};
}
static void stage(const char *op, bf16 *dst, const float *src, int B, int T, int heads, int hd) {
    const int Tp = padded_T(T), DP = padded_D(hd);
    const size_t n8 = (size_t)B * heads * Tp * DP / 8;
    const unsigned blocks = ml_blocks(n8, 256) < 65535 ? ml_blocks(n8, 256) : 65535;
    LAUNCH(op, blocks, 256, k_attn_stage, dst, src, B, T, Tp, heads, hd, DP);
}

template <int NK> static size_t smem_fwd() { return sizeof(bf16) * 5 * tile<NK>::ELEMS; } // Q, 2 K, 2 V
template <int NK> static size_t smem_dkv() {                                              // K, V, 2 Q, 2 dO
    return sizeof(bf16) * 6 * tile<NK>::ELEMS + sizeof(float) * 4 * BT;
}

template <int NK>
static void fwd(float *out, float *att, const staged &st, int B, int T, int H, int KV, int hd, float scale) {
    const size_t sm = smem_fwd<NK>();
    static bool opted_in; // once per head size, not at every launch
    if (!opted_in)
        CK("attention_forward", cudaFuncSetAttribute(k_attn_fwd_tc<NK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
    opted_in = true;
    dim3 grid(H, B, padded_T(T) / BQ);
    LAUNCH_SMEM("attention_forward", grid, NT, sm, k_attn_fwd_tc<NK>, out, att, st.q, st.k, st.v, T, padded_T(T), H,
                KV, hd, scale);
}
#define DQ_BANDS 4 // dq's GEMMs run in at most this many bands of queries
// dS^T is held a chunk at a time: kv heads (with their query heads) for all B sequences while one kv head's
// fits ML_ATTN_DS_BYTES, else one kv head for as many sequences as fit (at least one: 537 MB at T 8192 with
// groups of 4), so long sequences at large batch do not need B x that. But a chunk always holds enough
// (sequence, kv head) pairs for ds_min_blocks blocks of the backward kernel (Tp / 64 per pair; 2 resident per
// SM, triangular work), past the budget if need be: a chunk of one pair at T 8192 would be 128 blocks, under
// one wave on an H100, and 2 x 4096 would run chunks of 256 blocks.
static size_t ds_budget = ML_ATTN_DS_BYTES;
static int ds_min_blocks = 512;
extern "C" void cuda_attention_set_ds_budget(size_t bytes, int min_blocks) { // backend_cuda.h
    ds_budget = bytes, ds_min_blocks = min_blocks;
}
struct ds_plan {
    int bc, kc;               // sequences and kv heads per chunk
    size_t ptr_offset, bytes; // dS, then dq's pointer arrays from ptr_offset (256-byte aligned)
};
static ds_plan plan_ds(int B, int T, int H, int KV) {
    const size_t one = sizeof(bf16) * (size_t)(H / KV) * padded_T(T) * padded_T(T); // one sequence, one kv head
    ds_plan p = {B, KV, 0, 0};
    if (B > 0 && one > 0) {
        const size_t tiles = padded_T(T) / BQ, busy = (ds_min_blocks + tiles - 1) / tiles;
        size_t pairs = ds_budget / one; // (sequence, kv head) pairs per chunk
        if (pairs < busy) pairs = busy;
        if (pairs < 1) pairs = 1;
        if (pairs >= (size_t)B) // every sequence, as many kv heads as fit
            p.kc = pairs / B > (size_t)KV ? KV : (int)(pairs / B);
        else // one kv head, as many sequences as fit
            p.kc = 1, p.bc = (int)pairs;
    }
    p.ptr_offset = ((size_t)p.bc * p.kc * one + 255) / 256 * 256;
    // 3 pointer arrays of DQ_BANDS x the chunk's (sequence, query head) problems
    p.bytes = p.ptr_offset + 3 * sizeof(void *) * DQ_BANDS * (size_t)p.bc * p.kc * (H / KV);
    return p;
}
size_t ml_attention_ds_bytes(int B, int T, int H, int KV) { return plan_ds(B, T, H, KV).bytes; }

// dq += dS K per band of queries [q0, q1) (multiples of 64 rows, at most DQ_BANDS): a band needs only keys
// [0, q1), so the GEMMs skip most of dS's zero upper triangle (62.5% of the full T x T product at 4 bands,
// not 100%). Per query head h of the chunk and sequence b: dq_b,h (rows q0..q1 of T x hd, row stride H hd) +=
// dS (those rows x keys 0..q1) K_b,kh. Column-major: dq^T (hd x n) = K^T (hd x q1, K as staged, ld DP) times
// dS^T's columns q0..q1 (dS^T stored [key][query], ld Tp).
static int dq_band(int T) {
    const int quarter = (T + DQ_BANDS - 1) / DQ_BANDS;
    return quarter < BT ? BT : (quarter + BT - 1) / BT * BT;
}
static int band_end(int q0, int band, int T) { return T - q0 < band ? T : q0 + band; }
// the operands of problem p = bl hc + hl (sequence b0 + bl, query head kh0 group + hl) of band j at
// [j bc hc + p] of each array
__global__ void k_dq_ptrs(const void **a, const void **bm, void **c, const bf16 *k, const bf16 *ds, float *dq, int bc,
                          int T, int Tp, int DP, int H, int KV, int b0, int kh0, int hc, int group, int hd, int band,
                          int nb) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, n = bc * hc;
    if (i >= nb * n) return;
    const int j = i / n, p = i % n, bl = p / hc, hl = p % hc, b = b0 + bl, h = kh0 * group + hl, q0 = j * band;
    a[i] = k + ((size_t)b * KV + h / group) * Tp * DP;
    bm[i] = ds + ((size_t)bl * hc + hl) * Tp * Tp + q0;
    c[i] = dq + ((size_t)b * T + q0) * H * hd + (size_t)h * hd;
}
// One pointer-array batched GEMM per band over every (b, h) of the chunk: up to 4 calls a chunk, each with all
// the chunk's problems' output tiles to spread over the SMs. A strided batch can span only the B sequences of one
// head (the K operand's stride changes between kv heads), and at 2 x 4096 a band's hd x 1024 output per
// sequence is a few tiles: 64 such calls per layer would leave most SMs idle. A cuBLAS that refuses the
// pointer-array form (not expected: it takes the same types as cublasGemmEx) gets that loop instead, and so
// does a head size that is not a multiple of 4: cuBLAS cannot see pointers held in device memory, and for bf16
// inputs wants every matrix 16-byte aligned (dq's rows of one head start hd floats apart).
static int dq_strided; // 1 after a refusal, or set by tests
extern "C" int cuda_attention_set_dq_strided(int on) { // backend_cuda.h
    const int was = dq_strided;
    dq_strided = on;
    return was;
}
static void dq_gemms(float *dq, const bf16 *k, const bf16 *ds, void **ptrs, int T, int H, int KV, int hd, int DP,
                     int b0, int bc, int kh0, int hc) {
    const int Tp = padded_T(T), group = H / KV, band = dq_band(T), nb = (T + band - 1) / band, n = bc * hc;
    const float one = 1;
    if (!dq_strided && hd % 4 == 0 && (uintptr_t)dq % 16 == 0 && n > 0 && nb > 0) {
        const void **a = (const void **)ptrs, **bm = a + (size_t)nb * n;
        void **c = ptrs + 2 * (size_t)nb * n;
        LAUNCH("attention_backward", ml_blocks(nb * n, 128), 128, k_dq_ptrs, a, bm, c, k, ds, dq, bc, T, Tp, DP, H, KV,
               b0, kh0, hc, group, hd, band, nb);
        for (int j = 0; j < nb; j++) {
            const int q0 = j * band, q1 = band_end(q0, band, T);
            const cublasStatus_t st = cublasGemmBatchedEx(
                ml_blas, CUBLAS_OP_N, CUBLAS_OP_T, hd, q1 - q0, q1, &one, a + (size_t)j * n, CUDA_R_16BF, DP,
                bm + (size_t)j * n, CUDA_R_16BF, Tp, &one, c + (size_t)j * n, CUDA_R_32F, H * hd, n, CUBLAS_COMPUTE_32F,
                CUBLAS_GEMM_DEFAULT);
            if (st == CUBLAS_STATUS_SUCCESS) continue;
            if (st != CUBLAS_STATUS_NOT_SUPPORTED || j > 0) BK("attention_backward", st); // bands done: cannot redo
            fprintf(stderr, "moelab cuda: attention_backward: cuBLAS refused the pointer-array batched GEMM for dq; "
                            "using a strided batch per query head\n");
            dq_strided = 1;
            break;
        }
        if (!dq_strided) return;
    }
    // a strided batch per query head and band, over the chunk's sequences
    for (int hl = 0; hl < hc; hl++) {
        const int h = kh0 * group + hl, kh = h / group;
        for (int q0 = 0; q0 < T; q0 += band) {
            const int q1 = band_end(q0, band, T);
            BK("attention_backward",
               cublasGemmStridedBatchedEx(ml_blas, CUBLAS_OP_N, CUBLAS_OP_T, hd, q1 - q0, q1, &one,
                                          k + ((size_t)b0 * KV + kh) * Tp * DP, CUDA_R_16BF, DP,
                                          (long long)KV * Tp * DP, ds + (size_t)hl * Tp * Tp + q0, CUDA_R_16BF, Tp,
                                          (long long)hc * Tp * Tp, &one,
                                          dq + ((size_t)b0 * T + q0) * H * hd + (size_t)h * hd, CUDA_R_32F, H * hd,
                                          (long long)T * H * hd, bc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    }
}

template <int NK>
static void bwd(float *dq, float *dk, float *dv, const float *lse, const float *delta, const staged &st, int B, int T,
                int H, int KV, int hd, float scale) {
    const size_t skv = smem_dkv<NK>();
    static bool opted_in;
    if (!opted_in)
        CK("attention_backward", cudaFuncSetAttribute(k_attn_dkv_tc<NK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)skv));
    opted_in = true;
    const int Tp = padded_T(T), DP = 16 * NK, group = H / KV;
    const ds_plan pl = plan_ds(B, T, H, KV);
    char *wsp = (char *)ml_ws(WS_ATTN_DS, pl.bytes);
    bf16 *ds = (bf16 *)wsp;
    void **ptrs = (void **)(wsp + pl.ptr_offset);
#ifdef ML_CUDA_EMU // the emulator: a dS element the kernel fails to write reads as NaN, not as a stale value
    CK("attention_backward", cudaMemset(ds, 0xff, pl.bytes));
#endif
    for (int b0 = 0; b0 < B; b0 += pl.bc)
        for (int kh0 = 0; kh0 < KV; kh0 += pl.kc) {
            const int bc = B - b0 < pl.bc ? B - b0 : pl.bc, kc = KV - kh0 < pl.kc ? KV - kh0 : pl.kc, hc = kc * group;
            dim3 gkv(kc, bc, Tp / BQ);
            LAUNCH_SMEM("attention_backward", gkv, NT, skv, k_attn_dkv_tc<NK>, dk, dv, ds, lse, delta, st.q, st.g,
                        st.k, st.v, T, Tp, H, KV, b0, kh0, hd, scale);
            dq_gemms(dq, st.k, ds, ptrs, T, H, KV, hd, DP, b0, bc, kh0, hc);
        }
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
    if (hd < 1 || hd > 128) ml_cuda_die("attention_forward", "head dimension outside 1..128");
    const float scale = (float)(1.0 / sqrt((double)hd));
    const staged st = stage_ptrs(B, T, H, KV, hd);
    stage("attention_forward", st.q, q, B, T, H, hd);
    stage("attention_forward", st.k, k, B, T, KV, hd);
    stage("attention_forward", st.v, v, B, T, KV, hd);
#define CALL(nk) fwd<nk>(out, att, st, B, T, H, KV, hd, scale)
    DISPATCH_NK(hd, CALL)
#undef CALL
}
static void tc_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, float *att,
                                  const float *q, const float *k, const float *v, int B, int T, int H, int KV,
                                  int hd) {
    PROF("attention_backward");
    if (KV <= 0 || H % KV) ml_cuda_die("attention_backward", "heads not a multiple of kv_heads");
    if (hd < 1 || hd > 128) ml_cuda_die("attention_backward", "head dimension outside 1..128");
    const float scale = (float)(1.0 / sqrt((double)hd));
    float *delta = att + (size_t)B * H * T;
    ml_attention_delta(delta, dout, out, B, T, H, hd);
    const staged st = stage_ptrs(B, T, H, KV, hd);
    stage("attention_backward", st.q, q, B, T, H, hd);
    stage("attention_backward", st.g, dout, B, T, H, hd);
    stage("attention_backward", st.k, k, B, T, KV, hd);
    stage("attention_backward", st.v, v, B, T, KV, hd);
#define CALL(nk) bwd<nk>(dq, dk, dv, att, delta, st, B, T, H, KV, hd, scale)
    DISPATCH_NK(hd, CALL)
#undef CALL
}

void ml_cuda_fill_attention_tc(ml_backend *b) {
    b->attention_forward = tc_attention_forward, b->attention_backward = tc_attention_backward;
}
