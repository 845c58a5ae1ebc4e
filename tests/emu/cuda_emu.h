// cuda_emu.h: the parts of CUDA, cuBLAS and mma.sync that kernels/*.cu use, emulated on the host, so the CUDA
// backend's own source runs (and is tested) on a machine without a GPU (tests/emu/include/* stand in for the
// toolkit's headers; kernels/cuda_common.cuh routes launches and dynamic shared memory here under ML_CUDA_EMU).
//   threads   fibers (ucontext), one block at a time, scheduled in a chosen order (ml_emu_set_order): lanes
//             in lock-step rounds (ascending, descending, random), or a warp at a time up to a block barrier;
//             __syncthreads and __syncwarp are real barriers: a barrier some threads never reach is reported
//             as a deadlock (exit 4); shuffles, __ballot_sync and __match_any_sync exchange values through a
//             warp barrier;
//   memory    "device" memory is host memory, NaN bytes when cudaMalloc returns it; static __shared__ arrays
//             are function statics (blocks run one after another); dynamic shared memory is filled with NaN bytes before each block and guarded by
//             a canary (an overflowing write exits 6); launches check the dynamic size against the attribute
//             set for that kernel with cudaFuncSetAttribute and the A100's limit (163 KB; the H100 takes 227);
//   mma       mma.sync m16n8k16 (bf16 inputs, fp32 accumulators) with the PTX ISA's fragment-to-lane layouts:
//             each lane gives its registers and gets its share of the product through a warp barrier;
//             ldmatrix .x4 (and .trans) the same way: each lane gives a row address, gets its elements;
//   cp.async  16-byte global -> shared copies in commit groups, per thread, completing either at issue (eager:
//             the earliest the hardware may; a buffer refilled while others still read it shows) or at the
//             wait_group that covers them (deferred: the latest; a tile read before its wait shows), chosen
//             with ml_emu_set_cp_async; addresses are checked (16-byte aligned, the destination inside the
//             block's shared memory, the source inside one cudaMalloc block: exit 8);
//   cuBLAS    Sgemm, GemmEx, GemmStridedBatchedEx and GemmGroupedBatchedEx as documented (column-major,
//             C = alpha op(A) op(B) + beta C), fp32 sums in k order; bf16 inputs read as bf16.
// What this cannot show: speed, the hardware's rounding inside mma and cuBLAS.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// the vector types with CUDA's alignment: a misaligned vector access faults on a GPU, and here UBSan's alignment
// check (tests/meson.build) stops the emulator with the line
struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) float2 {
    float x, y;
};
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(8) uint2 {
    unsigned x, y;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

// ---- bf16 ----
struct __nv_bfloat16 {
    uint16_t u;
};
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    __nv_bfloat16 r;
    if ((x & 0x7fffffffu) > 0x7f800000u) return r.u = (uint16_t)((x >> 16) | 0x40), r; // NaN stays NaN
    x += 0x7fffu + ((x >> 16) & 1); // round to nearest even
    r.u = (uint16_t)(x >> 16);
    return r;
}
static inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t x = (uint32_t)b.u << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

// ---- launch geometry and threads ----
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct ml_emu_idx {
    unsigned x, y, z;
};
extern ml_emu_idx blockIdx, gridDim, blockDim;
extern int ml_emu_cur;                    // the running thread of the block
const ml_emu_idx &ml_emu_thread_idx(void); // its threadIdx
#define threadIdx (ml_emu_thread_idx())

void ml_emu_launch(const void *kernel, dim3 grid, dim3 block, size_t smem, std::function<void()> body);
unsigned char *ml_emu_smem(void);
// 0 ascending, 1 descending, 2 random (seeded); 3 and 4: a warp at a time (ascending, descending warps) until it
// waits at __syncthreads or ends, so one warp runs far ahead of the others
void ml_emu_set_order(int order);

void ml_emu_barrier(int kind); // 1 = warp, 2 = block
static inline void __syncthreads() { ml_emu_barrier(2); }
static inline void __syncwarp(unsigned = 0xffffffffu) { ml_emu_barrier(1); }

template <class T> static inline T ml_emu_exchange(T v, int src_lane) {
    static T slot[1024];
    slot[ml_emu_cur] = v;
    __syncwarp();
    T r = slot[(ml_emu_cur & ~31) | (src_lane & 31)];
    __syncwarp();
    return r;
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int m) {
    return ml_emu_exchange(v, (ml_emu_cur & 31) ^ m);
}
template <class T> static inline T __shfl_sync(unsigned, T v, int src) { return ml_emu_exchange(v, src); }
// every lane's v of the calling warp, in lane order, through a warp barrier
static inline void ml_emu_gather(int v, int all[32]) {
    static int slot[1024];
    slot[ml_emu_cur] = v;
    __syncwarp();
    memcpy(all, &slot[ml_emu_cur & ~31], sizeof(int) * 32);
    __syncwarp();
}
static inline unsigned __match_any_sync(unsigned, int v) {
    int all[32];
    ml_emu_gather(v, all);
    unsigned m = 0;
    for (int l = 0; l < 32; l++) m |= (unsigned)(all[l] == v) << l;
    return m;
}
static inline unsigned __ballot_sync(unsigned, int pred) {
    int all[32];
    ml_emu_gather(pred != 0, all);
    unsigned m = 0;
    for (int l = 0; l < 32; l++) m |= (unsigned)all[l] << l;
    return m;
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling warp, d += a b: each lane gives its
// registers (PTX ISA fragment layouts, g = lane / 4, t = lane % 4: A {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
// (g+8, 2t+8..)}, B {(2t..2t+1, g), (2t+8.., g)}, C {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}; the lower
// half of a register is the element of lower index) and gets its share of the product, summed in k order.
static inline float ml_emu_bf16_bits(uint32_t h) {
    uint32_t x = (h & 0xffffu) << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}
// One warp barrier per call: the registers go to one of two slot sets by call parity, so a lane that runs ahead
// into the next call writes the other set while slower lanes still read this one.
static inline void ml_emu_mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    static uint32_t sa[2][1024][4], sb[2][1024][2];
    static unsigned char parity[1024];
    const int me = ml_emu_cur, base = me & ~31, lane = me & 31, g = lane / 4, t = lane % 4, p = parity[me];
    parity[me] ^= 1;
    memcpy(sa[p][me], a, sizeof sa[p][me]), memcpy(sb[p][me], b, sizeof sb[p][me]);
    __syncwarp();
    auto A = [&](int r, int c) {
        const uint32_t w = sa[p][base + (r % 8) * 4 + (c % 8) / 2][(r >= 8) + 2 * (c >= 8)];
        return ml_emu_bf16_bits(c & 1 ? w >> 16 : w);
    };
    auto B = [&](int r, int c) {
        const uint32_t w = sb[p][base + c * 4 + (r % 8) / 2][r >= 8];
        return ml_emu_bf16_bits(r & 1 ? w >> 16 : w);
    };
    for (int i = 0; i < 4; i++) {
        const int r = g + 8 * (i >> 1), c = 2 * t + (i & 1);
        for (int k = 0; k < 16; k++) d[i] += A(r, k) * B(k, c);
    }
}
// shared memory checks for ldmatrix and cp.async: exits 8 unless [p, p + 16) is 16-byte aligned and inside the
// running block's dynamic shared memory
void ml_emu_check_smem16(const void *p, const char *what);
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for the calling warp: lanes 8i..8i+7 give the row addresses
// of matrix i (8 x 8 b16, rows of 16 bytes); lane l gets in r[i] row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1
// of matrix i, or with trans column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1 (lower index in the lower half).
// One warp barrier per call (slot sets by parity, as for mma); the rows are read after it.
static inline void ml_emu_ldmatrix_x4(uint32_t r[4], const void *row, bool trans) {
    static const uint16_t *slot[2][1024];
    static unsigned char parity[1024];
    const int me = ml_emu_cur, base = me & ~31, lane = me & 31, g = lane / 4, t = lane % 4, p = parity[me];
    ml_emu_check_smem16(row, "ldmatrix");
    parity[me] ^= 1;
    slot[p][me] = (const uint16_t *)row;
    __syncwarp();
    for (int i = 0; i < 4; i++) {
        const uint16_t *const *rows = &slot[p][base + 8 * i];
        const uint16_t lo = trans ? rows[2 * t][g] : rows[g][2 * t], hi = trans ? rows[2 * t + 1][g] : rows[g][2 * t + 1];
        r[i] = (uint32_t)lo | (uint32_t)hi << 16;
    }
}
// cp.async.cg.shared.global (16 bytes), cp.async.commit_group, cp.async.wait_group n for the calling thread
void ml_emu_cp_async16(void *dst, const void *src);
void ml_emu_cp_async_commit(void);
void ml_emu_cp_async_wait(int n);
void ml_emu_set_cp_async(int deferred); // 0: copies complete at issue, 1: at the wait that covers them
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

// ---- runtime API ----
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum { cudaEventDisableTiming = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
typedef struct ml_emu_event *cudaEvent_t;
typedef void *cudaStream_t;
struct cudaDeviceProp {
    char name[256];
    int major, minor;
    size_t totalGlobalMem;
};
cudaError_t cudaMalloc(void **p, size_t bytes);
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t bytes) { return cudaMalloc((void **)p, bytes); }
cudaError_t cudaMallocHost(void **p, size_t bytes);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total);
cudaError_t cudaFreeHost(void *p);
template <class T> static inline cudaError_t cudaMallocHost(T **p, size_t bytes) {
    return cudaMallocHost((void **)p, bytes);
}
cudaError_t cudaFree(void *p);
cudaError_t cudaMemset(void *p, int v, size_t bytes);
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s = 0);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = 0);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaGetLastError(void);
const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t ml_emu_func_set_attribute(const void *kernel, cudaFuncAttribute a, int v);
template <class F> static inline cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute a, int v) {
    return ml_emu_func_set_attribute(reinterpret_cast<const void *>(f), a, v);
}

// ---- cuBLAS ----
typedef struct ml_emu_blas *cublasHandle_t;
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0 } cublasMath_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType_t;
cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
const char *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B,
                            cudaDataType_t bt, int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType_t at, int lda,
                                          long long strideA, const void *B, cudaDataType_t bt, int ldb,
                                          long long strideB, const void *beta, void *C, cudaDataType_t ct, int ldc,
                                          long long strideC, int batch, cublasComputeType_t compute,
                                          cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void *alpha, const void *const A[], cudaDataType_t at, int lda,
                                   const void *const B[], cudaDataType_t bt, int ldb, const void *beta, void *const C[],
                                   cudaDataType_t ct, int ldc, int batch, cublasComputeType_t compute,
                                   cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[],
                                          const int m[], const int n[], const int k[], const void *alpha,
                                          const void *const A[], cudaDataType_t at, const int lda[],
                                          const void *const B[], cudaDataType_t bt, const int ldb[], const void *beta,
                                          void *const C[], cudaDataType_t ct, const int ldc[], int groups,
                                          const int group_size[], cublasComputeType_t compute);
