// mma_sm80.cuh: the warp-level tensor-core primitives moelab's own GEMM-like kernels share (attention_tc.cu,
// expert_wgrad.cu), as PTX for sm_80 and later, or the host emulator's versions under ML_CUDA_EMU:
// cp.async (16 bytes global -> shared, commit groups), ldmatrix x4 (.trans) and mma.sync m16n8k16 with bf16
// inputs and fp32 accumulators.
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4): A 16 x 16 row-major, registers
// {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B 16 x 8, registers {(2t..2t+1, g), (2t+8.., g)};
// C 16 x 8 fp32 {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
#pragma once
#include "cuda_common.cuh"

#ifndef ML_CUDA_EMU
static __device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
#endif
// 16 bytes global -> shared without passing through registers; completes at a cp_async_wait
static __device__ __forceinline__ void cp_async16(void *dst, const void *src) {
#ifdef ML_CUDA_EMU
    ml_emu_cp_async16(dst, src);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(__cvta_generic_to_global(src))
                 : "memory");
#endif
}
static __device__ __forceinline__ void cp_async_commit() {
#ifdef ML_CUDA_EMU
    ml_emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// waits until at most N of this thread's committed groups are in flight
template <int N> static __device__ __forceinline__ void cp_async_wait() {
#ifdef ML_CUDA_EMU
    ml_emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// ldmatrix x4: lanes 8i..8i+7 point at the rows of 8 x 8 matrix i; TRANS reads the matrices down their columns
template <bool TRANS> static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16 *row) {
#ifdef ML_CUDA_EMU
    ml_emu_ldmatrix_x4(r, row, TRANS);
#else
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row)));
#endif
}

// D += A B for one warp (m16n8k16, bf16 inputs, fp32 accumulators)
static __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
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
