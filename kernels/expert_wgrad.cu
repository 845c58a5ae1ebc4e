// expert_wgrad.cu: the experts' weight gradients in the bf16 ("cuda") table, on tensor cores straight into the
// fp32 gradient: for every expert e with rows, dw_e(N x K) += dout_e^T inp_e, dout_e and inp_e being its rows
// [offsets[e], offsets[e+1]) of the permuted (rows x N) and (rows x K) bf16 operands.
// Why not cuBLAS: its grouped GEMM takes bf16 inputs only with bf16 outputs (cuBLAS 13.0 on an H100), which
// cannot accumulate into fp32, so these ran as grouped TF32 GEMMs on the fp32 operands (about 66 TFLOP/s on an
// H100 at 96 experts of ~170 rows). With so few rows per expert the product is bound by reading and writing dw
// (8 bytes per parameter per micro-batch), which this kernel does once, on bf16 mma.sync.
// A block owns a 128 x 128 tile of one expert's dw: 8 warps (4 along N x 2 along K, 32 x 64 each, fp32
// accumulators in registers) walk the expert's rows 32 at a time, both operand tiles double-buffered in shared
// memory by cp.async (rows past the expert's end and columns past N or K zero-filled), fragments by
// ldmatrix.trans (both operands are read down their columns: the token index is the reduction), then add their
// sums into dw. The offsets are read on the device: no host round trip. Deterministic: each dw element has one
// writer and its sum runs in a fixed order. Needs N and K multiples of 8 (16-byte rows of 8 bf16).
// A block walks its expert's rows alone, which suits balanced routing (tens to hundreds of rows per expert) but
// would leave a hot expert's few blocks running long after the rest when routing collapses (the regime moelab
// studies): experts with at least ml_expert_wgrad_hot_rows rows leave the kernel at once and take one
// cublasGemmEx each instead (bf16 inputs, fp32 output accumulated in place: taken outside the grouped call).
// `fresh` (dw holds no gradient yet: its zeroing was deferred, runtime_cuda.cu's zero_deferred): the sums are
// written, not added, and empty experts' tiles written as zeros, so dw is written once instead of zeroed, read
// and written.
#include "mma_sm80.cuh"

int ml_expert_wgrad_hot_rows = 2048; // a test hook moves it

#define WG_BN 128      // dw rows (output features) per block
#define WG_BK 128      // dw columns (input features) per block
#define WG_BT 32       // expert rows per stage (the reduction)
#define WG_THREADS 256 // 8 warps: 4 along N x 2 along K
#define WG_LD (128 + 8) // shared row pitch in bf16: 16 bytes of padding put an ldmatrix phase's rows on distinct banks
#define WG_STAGE (2 * WG_BT * WG_LD) // one stage: the dout tile, then the inp tile
static_assert(WG_BN == 128 && WG_BK == 128, "two 16-byte chunks per thread and operand tile");
static const size_t wg_smem = sizeof(bf16) * 2 * WG_STAGE; // 34,816 bytes

// rows [row0, row0 + 32) of one operand (row pitch ld, columns [col0, col0 + 128)) into a shared tile: 16-byte
// asynchronous copies; rows at or past `rows` and columns at or past `cols` become zeros
__device__ __forceinline__ void wg_load(bf16 *dst, const bf16 *src, int row0, int rows, int col0, int cols, int ld) {
#pragma unroll
    for (int j = 0; j < 2; j++) { // 32 rows x 16 chunks = 512 = 2 per thread
        const int i = threadIdx.x + j * WG_THREADS, r = i / 16, c = i % 16 * 8;
        cp_async16_or_zero(dst + r * WG_LD + c, src, row0 + r, col0 + c, rows, cols, ld);
    }
}

__global__ void __launch_bounds__(WG_THREADS) k_expert_wgrad(float *dw, const bf16 *dout, const bf16 *inp,
                                                             const int32_t *offsets, int N, int K, int tiles_n,
                                                             int tiles_k, int hot_rows, int fresh) {
    ML_DYNAMIC_SMEM(bf16, smem);
    const int per_expert = tiles_n * tiles_k, e = blockIdx.x / per_expert, tile = blockIdx.x % per_expert;
    const int lo = offsets[e], rows = offsets[e + 1] - lo;
    // block-uniform: an empty expert's gradient is not touched (zeroed when fresh); a hot one's is cuBLAS's
    if (rows >= hot_rows || (rows <= 0 && !fresh)) return;
    const int n0 = tile / tiles_k * WG_BN, k0 = tile % tiles_k * WG_BK;
    const int warp = threadIdx.x / 32, l = threadIdx.x % 32, wn = warp / 2 * 32, wk = warp % 2 * 64;
    const bf16 *g = dout + (size_t)lo * N, *x = inp + (size_t)lo * K;

    float acc[2][8][4]; // [16-row slab along N][8-column slab along K][C fragment]
    warp_tile_zero(acc);

    const int chunks = rows > 0 ? (rows + WG_BT - 1) / WG_BT : 0; // (block-uniform)
    if (chunks) wg_load(smem, g, 0, rows, n0, N, N);
    if (chunks) wg_load(smem + WG_BT * WG_LD, x, 0, rows, k0, K, K);
    cp_async_commit();
    for (int ch = 0; ch < chunks; ch++) {
        bf16 *gs = smem + (ch & 1) * WG_STAGE, *xs = gs + WG_BT * WG_LD;
        if (ch + 1 < chunks) { // the next chunk into the other stage, in flight while this one is used
            bf16 *ng = smem + ((ch + 1) & 1) * WG_STAGE;
            wg_load(ng, g, (ch + 1) * WG_BT, rows, n0, N, N);
            wg_load(ng + WG_BT * WG_LD, x, (ch + 1) * WG_BT, rows, k0, K, K);
        }
        cp_async_commit(); // (empty on the last chunk: the wait below counts groups uniformly)
        cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < WG_BT / 16; kk++) {
            // A(m, k) = dout tile[k][m]: matrices (t 0-7, n 0-7), (t 0-7, n 8-15), (t 8-15, n 0-7), (t 8-15, n 8-15)
            uint32_t a[2][4], b[4][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
                ldsm_x4<true>(a[mt], gs + (kk * 16 + l / 16 * 8 + l % 8) * WG_LD + wn + mt * 16 + l / 8 % 2 * 8);
            // B(k, n) = inp tile[k][n]: b[np][0..1] for columns wk + 16 np + [0, 8), b[np][2..3] for the next 8
#pragma unroll
            for (int np = 0; np < 4; np++)
                ldsm_x4<true>(b[np], xs + (kk * 16 + l % 8 + l / 8 % 2 * 8) * WG_LD + wk + np * 16 + l / 16 * 8);
            warp_tile_mma(acc, a, b);
        }
        __syncthreads(); // every warp is done with this stage before the next iteration refills it
    }

    if (n0 + wn < N && k0 + wk < K) { // (K even) the warp's part of dw += its sums (= when fresh)
        float *d = dw + (size_t)e * N * K + (size_t)(n0 + wn) * K + k0 + wk;
        if (fresh)
            warp_tile_store<false>(d, acc, K, N - (n0 + wn), K - (k0 + wk));
        else
            warp_tile_store<true>(d, acc, K, N - (n0 + wn), K - (k0 + wk));
    }
}

// dw_e += dout_e^T inp_e for the E experts (dout: rows x N, inp: rows x K, bf16; offsets on the device and the
// host's copy of them); fresh: dw_e = dout_e^T inp_e, zeros for empty experts
void ml_expert_wgrad(const char *op, float *dw, const bf16 *dout, const bf16 *inp, const int32_t *offsets,
                     const int32_t *offsets_host, int E, int N, int K, int fresh) {
    if (N % 8 || K % 8) ml_cuda_die(op, "the experts' weight-gradient kernel needs N and K multiples of 8");
    const int tiles_n = (N + WG_BN - 1) / WG_BN, tiles_k = (K + WG_BK - 1) / WG_BK;
    const long long blocks = (long long)E * tiles_n * tiles_k;
    if (blocks > 0x7fffffff) ml_cuda_die(op, "too many weight-gradient tiles");
    LAUNCH_SMEM(op, dim3((unsigned)blocks), WG_THREADS, wg_smem, k_expert_wgrad, dw, dout, inp, offsets, N, K, tiles_n,
                tiles_k, ml_expert_wgrad_hot_rows, fresh);
    const float one = 1, beta = fresh ? 0.f : 1.f;
    for (int e = 0; e < E; e++) { // dw_e as K x N column-major += inp_e (K x rows) dout_e^T (rows x N)
        const int lo = offsets_host[e], rows = offsets_host[e + 1] - lo;
        if (rows < ml_expert_wgrad_hot_rows) continue;
        BK(op, cublasGemmEx(ml_blas, CUBLAS_OP_N, CUBLAS_OP_T, K, N, rows, &one, inp + (size_t)lo * K, CUDA_R_16BF, K,
                            dout + (size_t)lo * N, CUDA_R_16BF, N, &beta, dw + (size_t)e * N * K, CUDA_R_32F, K,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
}
