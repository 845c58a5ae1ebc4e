// attention_tc.cu: flash-style causal GQA attention on tensor cores, the "cuda" table's attention (FlashAttention-2
// structure: the score tile, the softmax and the accumulators live in registers). Same contract and saved state
// as attention_cuda.cu (lse, then delta, each B x H x T), which stays the fp32 table's and the reference these
// kernels are tested against. q, k, v, out and the gradients are fp32 in memory; tiles are rounded to bf16 as
// they enter shared memory; products accumulate in fp32 (mma.sync m16n8k16, bf16 inputs).
// The head dimension is padded with zeros to a multiple of 16 (NK = padded / 16 <= 8).
//   forward: a block = 4 warps x 16 query rows; key tiles of 64 (K row-major, V transposed in shared memory);
//            per warp S = Q K^T (16 x 64) in registers, online softmax (exp2, fp32), P rounded to bf16 straight
//            from the accumulator layout into the A-operand layout, O += P V in registers.
//   dq:      the same blocks; per key tile S = Q K^T, dP = dO V^T, dS = P (dP - delta) scale, dq += dS K.
//   dk, dv:  a block = 4 warps x 16 key rows; over the group's query heads and the query tiles at or after
//            the block's first key: S^T = K Q^T, dP^T = V dO^T, dv += P^T dO, dk += dS^T Q.
// Deterministic: every output element has one writer; sums run in a fixed order.
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4): A 16 x 16 row-major, registers
// {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B 16 x 8, registers {(2t..2t+1, g), (2t+8.., g)};
// C 16 x 8 fp32 {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}. Two adjacent C tiles (16 x 16) are one A tile.
#include "cuda_common.cuh"

#define BQ 64 // rows (queries or keys) per block: 4 warps x 16
#define BT 64 // columns per tile (keys or queries)
static_assert(BQ == BT, "the forward stages Q in the key tile's buffer; the shared-memory sizes assume BQ == BT");
#define FULL 0xffffffffu

// shared-memory row strides (bf16 elements): 8 extra elements spread a fragment load's 8 rows over all banks
template <int DP> struct strides {
    static constexpr int row = DP + 8; // a (rows x DP) tile, row-major
    static constexpr int tr = BT + 8;  // a (DP x 64) transposed tile
};

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const bf16 l = __float2bfloat16_rn(lo), h = __float2bfloat16_rn(hi);
    uint16_t a, b;
    memcpy(&a, &l, 2), memcpy(&b, &h, 2);
    return (uint32_t)a | (uint32_t)b << 16;
}
__device__ __forceinline__ uint32_t ld32(const bf16 *p) { return *(const uint32_t *)p; }

// rows [r0, r0 + n) of a (B,T,heads,hd) tensor at head h into a bf16 tile, zero padded to DP columns and past T;
// row-major (dst[r * row + d]) or transposed (dst[d * tr + r])
template <int DP, bool TRANSPOSED>
__device__ void load_tile(bf16 *dst, const float *src, int b, int r0, int n, int T, int heads, int h, int hd) {
    constexpr int row = strides<DP>::row, tr = strides<DP>::tr;
    if (hd % 4 == 0 && ((uintptr_t)src & 15) == 0) { // 16-byte loads
        const int q4 = DP / 4;
        for (int i = threadIdx.x; i < n * q4; i += blockDim.x) {
            const int r = i / q4, d = (i % q4) * 4, t = r0 + r;
            float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t < T && d < hd) x = *(const float4 *)&src[(((size_t)b * T + t) * heads + h) * hd + d];
            if (TRANSPOSED) {
                dst[(d + 0) * tr + r] = __float2bfloat16_rn(x.x), dst[(d + 1) * tr + r] = __float2bfloat16_rn(x.y);
                dst[(d + 2) * tr + r] = __float2bfloat16_rn(x.z), dst[(d + 3) * tr + r] = __float2bfloat16_rn(x.w);
            } else {
                *(uint32_t *)&dst[r * row + d] = pack2(x.x, x.y), *(uint32_t *)&dst[r * row + d + 2] = pack2(x.z, x.w);
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < n * DP; i += blockDim.x) {
        const int r = i / DP, d = i % DP, t = r0 + r;
        const float x = t < T && d < hd ? src[(((size_t)b * T + t) * heads + h) * hd + d] : 0.f;
        dst[TRANSPOSED ? d * tr + r : r * row + d] = __float2bfloat16_rn(x);
    }
}

// D += A B for one warp (m16n8k16, bf16 inputs, fp32 accumulators)
__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#ifdef ML_CUDA_EMU
    const uint32_t b[2] = {b0, b1};
    ml_emu_mma16816(d, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
// the A fragment of rows [0, 16) x columns [16 kk, 16 kk + 16) of a row-major bf16 tile (stride ld)
__device__ __forceinline__ void load_a(uint32_t a[4], const bf16 *tile, int ld, int kk) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const bf16 *p = tile + g * ld + kk * 16 + 2 * t;
    a[0] = ld32(p), a[1] = ld32(p + 8 * ld), a[2] = ld32(p + 8), a[3] = ld32(p + 8 * ld + 8);
}
// C(16 x 64) = A(16 x 16 NK, fragments a) B, B(k, n) = rows[n][k] of a row-major bf16 tile (stride ld): the
// 64 rows' products with the A rows, e.g. S = Q K^T with rows = the key tile
template <int NK>
__device__ __forceinline__ void mma_rows64(float c[8][4], const uint32_t a[NK][4], const bf16 *rows, int ld) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < NK; kk++) {
            const bf16 *p = rows + (n * 8 + g) * ld + kk * 16 + 2 * t;
            mma16816(c[n], a[kk], ld32(p), ld32(p + 8));
        }
    }
}
// acc(16 x DP) += P(16 x 64, C layout in c, rounded to bf16 here) B, B(k, n) = tr[n][k] of a transposed bf16
// tile (stride strides::tr), e.g. O += P V with tr = V^T
template <int NK>
__device__ __forceinline__ void mma_p_tr(float acc[2 * NK][4], const float c[8][4], const bf16 *tr) {
    constexpr int ld = BT + 8;
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int kk = 0; kk < BT / 16; kk++) {
        const uint32_t a[4] = {pack2(c[2 * kk][0], c[2 * kk][1]), pack2(c[2 * kk][2], c[2 * kk][3]),
                               pack2(c[2 * kk + 1][0], c[2 * kk + 1][1]), pack2(c[2 * kk + 1][2], c[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < 2 * NK; n++) {
            const bf16 *p = tr + (n * 8 + g) * ld + kk * 16 + 2 * t;
            mma16816(acc[n], a, ld32(p), ld32(p + 8));
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

// ---------------------------------------------------------------- forward

template <int NK>
__global__ void __launch_bounds__(128) k_attn_fwd_tc(float *out, float *lse, const float *q, const float *k,
                                                     const float *v, int T, int H, int KV, int hd, float scale) {
    constexpr int DP = 16 * NK, LD = strides<DP>::row;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Ks = (bf16 *)smem, *Vt = Ks + BT * LD; // Ks also stages Q before the loop
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / KV);
    const int t0 = (gridDim.x - 1 - blockIdx.x) * BQ, t_last = min(T - 1, t0 + BQ - 1), w0 = t0 + warp * 16;
    const float sl2 = scale * 1.4426950408889634f; // scores in log2 units: exp2 is one instruction
    load_tile<DP, false>(Ks, q, b, t0, BQ, T, H, h, hd);
    __syncthreads();
    uint32_t qa[NK][4];
#pragma unroll
    for (int kk = 0; kk < NK; kk++) load_a(qa[kk], Ks + warp * 16 * LD, LD, kk);
    float o[2 * NK][4];
#pragma unroll
    for (int n = 0; n < 2 * NK; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}; // rows g and g + 8; l: this thread's columns only
    for (int s0 = 0; s0 <= t_last; s0 += BT) {
        __syncthreads(); // Q's fragments are read (first tile) or the previous tile is consumed
        load_tile<DP, false>(Ks, k, b, s0, BT, T, KV, kh, hd);
        load_tile<DP, true>(Vt, v, b, s0, BT, T, KV, kh, hd);
        __syncthreads();
        if (s0 > w0 + 15) continue; // warp-uniform: every key of this tile is after this warp's rows
        float s[8][4];
        mma_rows64<NK>(s, qa, Ks, LD);
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
        mma_p_tr<NK>(o, s, Vt);
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

// ---------------------------------------------------------------- dq

template <int NK>
__global__ void __launch_bounds__(128) k_attn_dq_tc(float *dq, const float *dout, const float *lse,
                                                    const float *delta, const float *q, const float *k,
                                                    const float *v, int T, int H, int KV, int hd, float scale) {
    constexpr int DP = 16 * NK, LD = strides<DP>::row;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Qs = (bf16 *)smem, *Gs = Qs + BQ * LD, *Ks = Gs + BQ * LD, *Vs = Ks + BT * LD, *Kt = Vs + BT * LD;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / KV);
    const int t0 = (gridDim.x - 1 - blockIdx.x) * BQ, t_last = min(T - 1, t0 + BQ - 1), w0 = t0 + warp * 16;
    const float sl2 = scale * 1.4426950408889634f;
    load_tile<DP, false>(Qs, q, b, t0, BQ, T, H, h, hd);
    load_tile<DP, false>(Gs, dout, b, t0, BQ, T, H, h, hd);
    float L2[2], D[2]; // rows g and g + 8: lse in log2 units, delta
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int tt = w0 + g + 8 * r;
        const size_t row = ((size_t)b * H + h) * T + tt;
        L2[r] = tt < T ? lse[row] * 1.4426950408889634f : 0.f, D[r] = tt < T ? delta[row] : 0.f;
    }
    float acc[2 * NK][4];
#pragma unroll
    for (int n = 0; n < 2 * NK; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    for (int s0 = 0; s0 <= t_last; s0 += BT) {
        __syncthreads();
        load_tile<DP, false>(Ks, k, b, s0, BT, T, KV, kh, hd);
        load_tile<DP, false>(Vs, v, b, s0, BT, T, KV, kh, hd);
        load_tile<DP, true>(Kt, k, b, s0, BT, T, KV, kh, hd);
        __syncthreads();
        if (s0 > w0 + 15) continue;
        uint32_t a[NK][4];
        float s[8][4], dp[8][4];
#pragma unroll
        for (int kk = 0; kk < NK; kk++) load_a(a[kk], Qs + warp * 16 * LD, LD, kk);
        mma_rows64<NK>(s, a, Ks, LD); // Q K^T
#pragma unroll
        for (int kk = 0; kk < NK; kk++) load_a(a[kk], Gs + warp * 16 * LD, LD, kk);
        mma_rows64<NK>(dp, a, Vs, LD); // dO V^T
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = s0 + n * 8 + 2 * t + (i & 1), row = w0 + g + 8 * (i >> 1);
                const float p = key <= row && row < T ? exp2f(s[n][i] * sl2 - L2[i >> 1]) : 0.f;
                s[n][i] = p * (dp[n][i] - D[i >> 1]) * scale; // dS
            }
        mma_p_tr<NK>(acc, s, Kt); // dq += dS K
    }
    add_rows<NK>(dq, acc, b, w0, T, H, h, hd);
}

// ---------------------------------------------------------------- dk, dv

template <int NK>
__global__ void __launch_bounds__(128) k_attn_dkv_tc(float *dk, float *dv, const float *dout, const float *lse,
                                                     const float *delta, const float *q, const float *k,
                                                     const float *v, int T, int H, int KV, int hd, float scale) {
    constexpr int DP = 16 * NK, LD = strides<DP>::row;
    ML_DYNAMIC_SMEM(unsigned char, smem);
    bf16 *Ks = (bf16 *)smem, *Vs = Ks + BQ * LD, *Qs = Vs + BQ * LD, *Gs = Qs + BT * LD, *Qt = Gs + BT * LD;
    bf16 *Gt = Qt + DP * strides<DP>::tr;
    float *Lq = (float *)(Gt + DP * strides<DP>::tr), *Dq = Lq + BT;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kh = blockIdx.y, b = blockIdx.z, group = H / KV;
    const int s_first = blockIdx.x * BQ, w0 = s_first + warp * 16; // the first keys have the most queries
    const float sl2 = scale * 1.4426950408889634f;
    load_tile<DP, false>(Ks, k, b, s_first, BQ, T, KV, kh, hd);
    load_tile<DP, false>(Vs, v, b, s_first, BQ, T, KV, kh, hd);
    float ak[2 * NK][4], av[2 * NK][4];
#pragma unroll
    for (int n = 0; n < 2 * NK; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) ak[n][i] = av[n][i] = 0.f;
    for (int h = kh * group; h < (kh + 1) * group; h++)
        for (int q0 = s_first; q0 < T; q0 += BT) {
            __syncthreads();
            load_tile<DP, false>(Qs, q, b, q0, BT, T, H, h, hd);
            load_tile<DP, false>(Gs, dout, b, q0, BT, T, H, h, hd);
            load_tile<DP, true>(Qt, q, b, q0, BT, T, H, h, hd);
            load_tile<DP, true>(Gt, dout, b, q0, BT, T, H, h, hd);
            for (int i = threadIdx.x; i < BT; i += blockDim.x) {
                const size_t row = ((size_t)b * H + h) * T + q0 + i;
                Lq[i] = q0 + i < T ? lse[row] * 1.4426950408889634f : 0.f;
                Dq[i] = q0 + i < T ? delta[row] : 0.f;
            }
            __syncthreads();
            if (w0 >= T) continue; // warp-uniform: no key of this warp (every tile reaches its keys: q0 <= w0)
            uint32_t a[NK][4];
            float s[8][4], dp[8][4];
#pragma unroll
            for (int kk = 0; kk < NK; kk++) load_a(a[kk], Ks + warp * 16 * LD, LD, kk);
            mma_rows64<NK>(s, a, Qs, LD); // S^T = K Q^T
#pragma unroll
            for (int kk = 0; kk < NK; kk++) load_a(a[kk], Vs + warp * 16 * LD, LD, kk);
            mma_rows64<NK>(dp, a, Gs, LD); // dP^T = V dO^T
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int c = n * 8 + 2 * t + (i & 1), tq = q0 + c, key = w0 + g + 8 * (i >> 1);
                    const float p = tq < T && tq >= key && key < T ? exp2f(s[n][i] * sl2 - Lq[c]) : 0.f;
                    s[n][i] = p, dp[n][i] = p * (dp[n][i] - Dq[c]) * scale;
                }
            mma_p_tr<NK>(av, s, Gt);  // dv += P^T dO
            mma_p_tr<NK>(ak, dp, Qt); // dk += dS^T Q
        }
    add_rows<NK>(dk, ak, b, w0, T, KV, kh, hd);
    add_rows<NK>(dv, av, b, w0, T, KV, kh, hd);
}

// ---------------------------------------------------------------- launch

static size_t smem_fwd(int DP) { return sizeof(bf16) * (BT * (DP + 8) + DP * (BT + 8)); }
static size_t smem_dq(int DP) { return sizeof(bf16) * (4 * BQ * (DP + 8) + DP * (BT + 8)); }
static size_t smem_dkv(int DP) { return sizeof(bf16) * (4 * BQ * (DP + 8) + 2 * DP * (BT + 8)) + sizeof(float) * 2 * BT; }

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
