// cuda_common.cuh: what every file of the CUDA backend shares: error checks that name the op, launches, the
// deterministic block reductions, the cuBLAS handle, the scratch workspace, bf16 weight shadows and the
// per-op CUDA-event profiler. Everything runs on the legacy default stream, in issue order.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend.h"
#include "backend_cuda.h"
#include "config.h"
}

typedef __nv_bfloat16 bf16;

// two floats rounded to bf16 and packed in one word, the first in the lower half (the lower address)
__device__ inline uint32_t ml_bf16x2(float lo, float hi) {
    const bf16 l = __float2bfloat16_rn(lo), h = __float2bfloat16_rn(hi);
    uint16_t a, b;
    memcpy(&a, &l, 2), memcpy(&b, &h, 2);
    return (uint32_t)a | (uint32_t)b << 16;
}

#define ML_CUDA_MAX_E 1024 // experts per layer the router and dispatch kernels take

extern cublasHandle_t ml_blas; // created by backend_cuda*() (runtime_cuda.cu)

[[noreturn]] void ml_cuda_die(const char *op, const char *what);

#define CK(op, call)                                                                   \
    do {                                                                               \
        cudaError_t e_ = (call);                                                       \
        if (e_ != cudaSuccess) ml_cuda_die(op, cudaGetErrorString(e_));                \
    } while (0)
#define BK(op, call)                                                                   \
    do {                                                                               \
        cublasStatus_t s_ = (call);                                                    \
        if (s_ != CUBLAS_STATUS_SUCCESS) ml_cuda_die(op, cublasGetStatusString(s_));   \
    } while (0)
// A kernel launch and a kernel's dynamic shared memory. Under ML_CUDA_EMU (tests/emu) the host emulator runs
// the same kernels: launches become calls into it and dynamic shared memory its buffer.
#ifdef ML_CUDA_EMU
#define ML_KERNEL_CALL(grid, block, smem, kernel, ...)                                                       \
    ml_emu_launch(reinterpret_cast<const void *>(&kernel), dim3(grid), dim3(block), (smem),                      \
                  [=] { kernel(__VA_ARGS__); })
#define ML_DYNAMIC_SMEM(type, name) type *name = (type *)ml_emu_smem()
#else
#define ML_KERNEL_CALL(grid, block, smem, kernel, ...) kernel<<<(grid), (block), (smem)>>>(__VA_ARGS__)
#define ML_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif
// a kernel launch: checks the launch itself; errors inside the kernel surface at the next sync
#define LAUNCH(op, grid, block, kernel, ...)                                           \
    do {                                                                               \
        if ((grid) > 0) {                                                              \
            ML_KERNEL_CALL(grid, block, 0, kernel, __VA_ARGS__);                       \
            CK(op, cudaGetLastError());                                                \
        }                                                                              \
    } while (0)
#define LAUNCH_SMEM(op, grid, block, smem, kernel, ...)                                \
    do {                                                                               \
        if ((grid).x > 0 && (grid).y > 0 && (grid).z > 0) {                            \
            ML_KERNEL_CALL(grid, block, smem, kernel, __VA_ARGS__);                    \
            CK(op, cudaGetLastError());                                                \
        }                                                                              \
    } while (0)

static inline unsigned ml_blocks(size_t n, int per = 256) { return (unsigned)((n + per - 1) / per); }

// ---- the per-op profiler: a scope at the top of each table entry records a CUDA event pair when on ----
struct ml_prof_scope {
    int slot;
    explicit ml_prof_scope(const char *op);
    ~ml_prof_scope();
};
#define PROF(op) ml_prof_scope prof_scope_(op)
// Advanced at the start of every table entry but the dense GEMMs and by every write the table makes to memory
// (alloc, free, memset0, from_host, zero_deferred): gemm_cuda.cu keeps an activation's bf16 rounding only within
// one epoch, so consecutive dense GEMMs on one input (the q, k and v projections) round it once.
extern unsigned long ml_epoch;

// ---- zeroing deferred to the op that writes a range whole (runtime_cuda.cu) ----
int ml_deferred_zero_take(const void *p, size_t bytes); // 1: [p, p + bytes) was deferred whole, now the caller's
// zero now the deferred ranges that overlap [p, p + bytes) (p NULL: all of them)
void ml_deferred_zero_complete(const char *op, const void *p, size_t bytes);

// ---- scratch: numbered slots, sized by prepare() so no step allocates (a slot that must grow later is
// counted: cuda_alloc_count() shows it) ----
enum { WS_CAST_A, WS_CAST_B, WS_CAST_W, WS_REDUCE, WS_DISPATCH, WS_CAPACITY, WS_GROUPED_OUT, WS_ATTN, WS_ATTN_DS,
       WS_SLOTS };
void *ml_ws(int slot, size_t bytes);
int ml_grouped_bf16_outputs(void); // the bf16 experts write bf16 (WS_GROUPED_OUT) and widen it (gemm_cuda.cu)
int ml_grouped_bf16_outputs_planned(void); // the same, as cuBLAS 13.0 answers, for a plan made without a GPU

// ---- bf16 shadows of the bound fp32 master weights ----
const bf16 *ml_shadow_of(const float *w, size_t n); // the bf16 copy of w[0..n) or NULL when w is not bound
bf16 *ml_shadow_range(const float *p, size_t n);    // for writers: the shadow of p[0..n), NULL when unbound

// ---- host copies of dispatch offsets (written by moe_dispatch, read by the grouped GEMMs) ----
void ml_offsets_publish(const int32_t *offsets, int E);
const int32_t *ml_offsets_host(const char *op, const int32_t *offsets, int E);

// ---- deterministic block reductions (fixed order) ----
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
__device__ inline float block_max(float v, float *shared) {
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
// v[threadIdx.x] becomes the sum of v[0..threadIdx.x] (Hillis-Steele; one entry per thread of the block, all
// written before the call and followed by a barrier)
template <class T> __device__ inline void block_inclusive_scan(T *v) {
    const int t = threadIdx.x;
    for (int d = 1; d < (int)blockDim.x; d *= 2) {
        const T add = t >= d ? v[t - d] : 0;
        __syncthreads();
        v[t] += add;
        __syncthreads();
    }
}
__device__ inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
#define RBLOCK 256
#define ML_NORM_CHUNKS 1024 // rmsnorm's weight gradient: at most this many row chunks, summed apart, then in order

// ---- the op groups, defined in their files and collected into the tables by runtime_cuda.cu ----
void ml_cuda_fill_ops(ml_backend *b);       // ops_cuda.cu: everything but GEMMs and attention
void ml_cuda_fill_attention(ml_backend *b);    // attention_cuda.cu: fp32 on CUDA cores
void ml_cuda_fill_attention_tc(ml_backend *b); // attention_tc.cu: bf16 tensor cores (the "cuda" table)
void ml_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int H, int hd);
// attention_tc.cu: the bytes of its bf16 staged q, dO, k, v (workspace slot WS_ATTN)
size_t ml_attention_stage_bytes(int B, int T, int H, int KV, int hd);
// and of its bf16 dS for dq, a chunk of kv heads at a time (WS_ATTN_DS), at most this much when a head fits
#define ML_ATTN_DS_BYTES ((size_t)512 << 20)
size_t ml_attention_ds_bytes(int B, int T, int H, int KV);
void ml_cuda_fill_gemms(ml_backend *b, int bf16_compute); // gemm_cuda.cu
void ml_cuda_gemm_init(void);
// the device bytes the op groups allocate once, whatever the model (for cuda_plan_memory)
size_t ml_gemm_fixed_bytes(void);
size_t ml_ops_fixed_bytes(void);
