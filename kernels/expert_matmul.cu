// expert_matmul.cu: the experts' forward and input-gradient GEMMs in the bf16 ("cuda") table on tensor cores,
// with fp32 outputs written (forward) or accumulated (input gradient) in place:
//   forward  out_e (rows_e x N)  = inp_e  (rows_e x K) W_e^T   (W_e: N x K)
//   dinp     dinp_e (rows_e x K) += dout_e (rows_e x N) W_e
// for the rows [offsets[e], offsets[e+1]) of each expert e, operands in bf16. cuBLAS's grouped GEMM takes bf16
// inputs only with bf16 outputs (cuBLAS 13.0, H100), so its path writes bf16 and widens (or adds) into fp32 in a
// second pass; this kernel writes fp32 at once and reads the offsets on the device. Opt-in for now
// (MOELAB_EXPERT_MATMUL=moelab or cuda_set_expert_matmul(1)) until a GPU has timed it against cuBLAS.
// A block owns a 128 x 128 tile of one expert's output (tiles are numbered expert after expert; a block finds
// its expert by binary search over the tile counts' prefix, made by a one-block kernel first). 8 warps (4 along
// the rows x 2 along the columns, 32 x 64 each, fp32 accumulators) walk the reduction 32 at a time, both operand
// tiles double-buffered by cp.async (zero-filled past the expert's rows and past the matrix edges), fragments by
// ldmatrix (W read down its columns for dinp), bf16 mma.sync. Each output element has one writer: deterministic.
// Needs N and K multiples of 8.
#include "mma_sm80.cuh"

#define EM_BM 128       // output rows (expert rows) per block
#define EM_BN 128       // output columns per block
#define EM_BR 32        // reduction per stage
#define EM_THREADS 256  // 8 warps: 4 along the rows x 2 along the columns
#define EM_LDA (EM_BR + 8)  // A tile [row][r]: pitch 80 bytes, an ldmatrix phase's 8 rows on distinct banks
#define EM_LDW (EM_BN + 8)  // W tile [r][n] (dinp): pitch 272 bytes
#define EM_LDWT (EM_BR + 8) // W tile [n][r] (forward): pitch 80 bytes
#define EM_A (EM_BM * EM_LDA)
#define EM_W (EM_BR * EM_LDW > EM_BN * EM_LDWT ? EM_BR * EM_LDW : EM_BN * EM_LDWT)
#define EM_STAGE (EM_A + EM_W)
static const size_t em_smem = sizeof(bf16) * 2 * EM_STAGE; // 40,960 bytes

// tile_start[e] = the number of 128-row tiles of experts before e (E + 1 entries); one block, E <= 1024
__global__ void k_expert_tile_starts(int32_t *tile_start, const int32_t *offsets, int E) {
    __shared__ int32_t count[ML_CUDA_MAX_E];
    const int e = threadIdx.x;
    count[e] = e < E ? (offsets[e + 1] - offsets[e] + EM_BM - 1) / EM_BM : 0;
    __syncthreads();
    block_inclusive_scan(count);
    if (e < E) tile_start[e + 1] = count[e];
    if (e == 0) tile_start[0] = 0;
}

// DINP = 0: out = A W^T (A: rows x K, W: N x K, out: rows x N, reduction K)
// DINP = 1: out += A W (A: rows x N, W: N x K, out: rows x K, reduction N)
template <int DINP>
__global__ void __launch_bounds__(EM_THREADS) k_expert_matmul(float *out, const bf16 *a, const bf16 *w,
                                                              const int32_t *offsets, const int32_t *tile_start,
                                                              int E, int N, int K) {
    ML_DYNAMIC_SMEM(bf16, smem);
    const int R = DINP ? N : K, C = DINP ? K : N; // reduction length, output columns
    const int col_tiles = (C + EM_BN - 1) / EM_BN, tile = blockIdx.x / col_tiles, c0 = blockIdx.x % col_tiles * EM_BN;
    int lo_e = 0, hi_e = E; // the expert e with tile_start[e] <= tile < tile_start[e + 1]
    while (hi_e - lo_e > 1) {
        const int mid = (lo_e + hi_e) / 2;
        if (tile_start[mid] <= tile) lo_e = mid;
        else hi_e = mid;
    }
    const int e = lo_e, first = offsets[e], rows = offsets[e + 1] - first;
    const int m0 = (tile - tile_start[e]) * EM_BM; // this block's first row within the expert
    const bf16 *ae = a + (size_t)(first + m0) * R, *we = w + (size_t)e * N * K;
    const int rows_here = rows - m0 < EM_BM ? rows - m0 : EM_BM;
    const int warp = threadIdx.x / 32, l = threadIdx.x % 32, wm = warp / 2 * 32, wn = warp % 2 * 64;

    float acc[2][8][4];
    warp_tile_zero(acc);

    auto load = [&](int stage, int r0) {
        bf16 *as = smem + stage * EM_STAGE, *ws = as + EM_A;
#pragma unroll
        for (int j = 0; j < 2; j++) { // A: 128 rows x 4 chunks; W: 512 chunks either way; 2 + 2 per thread
            const int i = threadIdx.x + j * EM_THREADS;
            cp_async16_or_zero(as + (i / 4) * EM_LDA + i % 4 * 8, ae, i / 4, r0 + i % 4 * 8, rows_here, R, R);
            if (DINP) // W rows r0.. (the reduction), columns c0..: tile [r][n]
                cp_async16_or_zero(ws + (i / 16) * EM_LDW + i % 16 * 8, we, r0 + i / 16, c0 + i % 16 * 8, N, K, K);
            else // W rows c0.. (output columns), columns r0..: tile [n][r]
                cp_async16_or_zero(ws + (i / 4) * EM_LDWT + i % 4 * 8, we, c0 + i / 4, r0 + i % 4 * 8, N, K, K);
        }
    };
    const int chunks = (R + EM_BR - 1) / EM_BR;
    load(0, 0);
    cp_async_commit();
    for (int ch = 0; ch < chunks; ch++) {
        if (ch + 1 < chunks) load((ch + 1) & 1, (ch + 1) * EM_BR);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16 *as = smem + (ch & 1) * EM_STAGE, *ws = as + EM_A;
#pragma unroll
        for (int kk = 0; kk < EM_BR / 16; kk++) {
            uint32_t af[2][4], bf[4][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) // A(m, k) = tile[m][k]
                ldsm_x4<false>(af[mt], as + (wm + mt * 16 + l % 16) * EM_LDA + kk * 16 + l / 16 * 8);
#pragma unroll
            for (int np = 0; np < 4; np++) { // bf[np][0..1]: columns wn + 16 np + [0, 8); [2..3]: the next 8
                if (DINP) // B(k, n) = tile[k][n], read down the columns
                    ldsm_x4<true>(bf[np], ws + (kk * 16 + l % 8 + l / 8 % 2 * 8) * EM_LDW + wn + np * 16 + l / 16 * 8);
                else // B(k, n) = tile[n][k]
                    ldsm_x4<false>(bf[np],
                                   ws + (wn + np * 16 + l % 8 + l / 16 * 8) * EM_LDWT + kk * 16 + l / 8 % 2 * 8);
            }
            warp_tile_mma(acc, af, bf);
        }
        __syncthreads(); // every warp is done with this stage before the next iteration refills it
    }

    if (wm < rows_here && c0 + wn < C) // (C even) the warp's part of the output
        warp_tile_store<DINP>(out + (size_t)(first + m0 + wm) * C + c0 + wn, acc, C, rows_here - wm,
                              C - (c0 + wn));
}

// forward (dinp = 0): out = inp_e W_e^T; input gradient (dinp = 1): out += dout_e W_e. a: the bf16 rows
// operand, w: the E bf16 weights (N x K each), offsets on the device, rows = offsets_host[E], the tile count
// from the host's copy of the offsets; tile_start: E + 1 ints of device scratch.
void ml_expert_matmul(const char *op, int dinp, float *out, const bf16 *a, const bf16 *w, const int32_t *offsets,
                      const int32_t *offsets_host, int32_t *tile_start, int E, int N, int K) {
    if (N % 8 || K % 8) ml_cuda_die(op, "the experts' matmul kernel needs N and K multiples of 8");
    if (((uintptr_t)a | (uintptr_t)w) % 16) ml_cuda_die(op, "the experts' matmul kernel needs 16-byte aligned input");
    long long tiles = 0;
    for (int e = 0; e < E; e++) tiles += (offsets_host[e + 1] - offsets_host[e] + EM_BM - 1) / EM_BM;
    const long long blocks = tiles * (((dinp ? K : N) + EM_BN - 1) / EM_BN);
    if (blocks == 0) return;
    if (blocks > 0x7fffffff) ml_cuda_die(op, "too many expert tiles");
    LAUNCH(op, 1, (E + 31) / 32 * 32, k_expert_tile_starts, tile_start, offsets, E);
    if (dinp)
        LAUNCH_SMEM(op, dim3((unsigned)blocks), EM_THREADS, em_smem, k_expert_matmul<1>, out, a, w, offsets,
                    tile_start, E, N, K);
    else
        LAUNCH_SMEM(op, dim3((unsigned)blocks), EM_THREADS, em_smem, k_expert_matmul<0>, out, a, w, offsets,
                    tile_start, E, N, K);
}
