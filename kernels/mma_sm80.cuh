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
// the 16 bytes at (row r, column c) of a row-major bf16 matrix (row pitch ld) into dst, asynchronously, when
// inside [0, rows) x [0, cols) (c and cols multiples of 8); zeros otherwise
static __device__ __forceinline__ void cp_async16_or_zero(bf16 *dst, const bf16 *src, int r, int c, int rows, int cols,
                                                          int ld) {
    if (r < rows && c < cols) cp_async16(dst, src + (size_t)r * ld + c);
    else *(uint4 *)dst = make_uint4(0, 0, 0, 0);
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

// ---- a warp's 32 x 64 fp32 tile (expert_wgrad.cu, expert_matmul.cu): acc[2][8][4], 2 x 8 C fragments ----
static __device__ __forceinline__ void warp_tile_zero(float acc[2][8][4]) {
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
}
// acc += A B for one 16-deep step: a[mt] the A fragments of rows 16 mt.., b[np] the B fragments of columns
// 16 np.. (b[np][0..1] the first 8 columns, b[np][2..3] the next 8)
static __device__ __forceinline__ void warp_tile_mma(float acc[2][8][4], const uint32_t a[2][4],
                                                     const uint32_t b[4][4]) {
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 8; nt++) mma16816(acc[mt][nt], a[mt], b[nt / 2][nt % 2 * 2], b[nt / 2][nt % 2 * 2 + 1]);
}
// the tile into the row-major fp32 matrix at out (row pitch ld, its first element the tile's corner): rows
// [0, rows) and columns [0, cols) of the tile, the rest skipped (cols and ld even); ADD: out += acc, else
// out = acc; 8-byte pairs when out is 8-byte aligned
template <bool ADD>
static __device__ __forceinline__ void warp_tile_store(float *out, const float acc[2][8][4], int ld, int rows,
                                                       int cols) {
    const int l = threadIdx.x % 32;
    const bool pairs = ((uintptr_t)out & 7) == 0;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const int c = nt * 8 + l % 4 * 2;
            if (c >= cols) continue; // cols even: c + 1 < cols too
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = mt * 16 + l / 4 + h * 8;
                if (r >= rows) continue;
                float *p = out + (size_t)r * ld + c;
                const float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
                if (pairs && ADD) {
                    float2 v = *(float2 *)p;
                    v.x += v0, v.y += v1;
                    *(float2 *)p = v;
                } else if (pairs) {
                    *(float2 *)p = make_float2(v0, v1);
                } else if (ADD) {
                    p[0] += v0, p[1] += v1;
                } else {
                    p[0] = v0, p[1] = v1;
                }
            }
        }
}
