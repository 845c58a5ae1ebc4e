// cuda_emu.h: the CUDA features kernels/attention_tc.cu uses, emulated on the host so its kernels run (and are
// tested) on a machine without a GPU. Threads are fibers (ucontext) scheduled in a chosen order; __syncthreads
// and __syncwarp are real barriers (a barrier some threads never reach is reported as a deadlock); shuffles
// go through the barrier. WMMA fragments hold whole 16x16 tiles with the documented row/col-major and leading
// dimension rules; every WMMA pointer is checked to lie in shared memory, 32-byte aligned, with a leading
// dimension that is a multiple of 16 bytes, and a store writes only the calling lane's share of the tile, so
// a load that misses a __syncwarp reads stale data. What this cannot show: the hardware's speed, its exact
// rounding inside mma (here fp32 sums in a fixed order) and the real fragment-to-lane mapping.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <functional>
#include <ucontext.h>
#include <random>
#include <algorithm>

struct bf16 { uint16_t u; };
static inline bf16 __float2bfloat16_rn(float f) {
    uint32_t x; memcpy(&x, &f, 4);
    bf16 r;
    if ((x & 0x7fffffffu) > 0x7f800000u) { r.u = (uint16_t)((x >> 16) | 0x40); return r; }
    uint32_t lsb = (x >> 16) & 1; x += 0x7fff + lsb; r.u = (uint16_t)(x >> 16); return r;
}
static inline float __bfloat162float(bf16 b) { uint32_t x = (uint32_t)b.u << 16; float f; memcpy(&f, &x, 4); return f; }

struct uint3_ { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };

// ---- fibers ----
enum { RUN, WWAIT, BWAIT, DONE };
struct Fiber { ucontext_t ctx; int state; uint3_ tidx; char *stack; };
extern Fiber *g_fib; extern int g_nthreads, g_cur; extern ucontext_t g_sched;
extern uint3_ blockIdx, gridDim; extern uint3_ blockDim;
extern unsigned char *g_smem; extern size_t g_smem_size;
#define threadIdx (g_fib[g_cur].tidx)
static inline void fiber_block(int st) { g_fib[g_cur].state = st; swapcontext(&g_fib[g_cur].ctx, &g_sched); }
static inline void __syncthreads() { fiber_block(BWAIT); }
static inline void __syncwarp(unsigned = 0xffffffffu) { fiber_block(WWAIT); }
extern float g_shfl[1024];
static inline float __shfl_xor_sync(unsigned, float v, int m) {
    g_shfl[g_cur] = v; __syncwarp();
    float r = g_shfl[(g_cur & ~31) | ((g_cur & 31) ^ m)]; __syncwarp();
    return r;
}
static inline float __shfl_sync(unsigned, float v, int src) {
    g_shfl[g_cur] = v; __syncwarp();
    float r = g_shfl[(g_cur & ~31) | (src & 31)]; __syncwarp();
    return r;
}
static inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
static inline unsigned ml_blocks(size_t n, int per = 256) { return (unsigned)((n + per - 1) / per); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

// ---- wmma ----
extern long g_wmma_violations;
static inline void chk_ptr(const void *p, unsigned ld, int elem, const char *what) {
    const unsigned char *c = (const unsigned char *)p;
    if (c < g_smem || c >= g_smem + g_smem_size) { if (g_wmma_violations++ < 10) fprintf(stderr, "%s: pointer outside smem\n", what); return; }
    if ((c - g_smem) % 32) { if (g_wmma_violations++ < 10) fprintf(stderr, "%s: pointer offset %ld not 32B aligned\n", what, (long)(c - g_smem)); }
    if (ld % (16 / elem)) { if (g_wmma_violations++ < 10) fprintf(stderr, "%s: ld %u not multiple of 16 bytes\n", what, ld); }
}
static inline void chk_elem(const void *p, const char *what) {
    const unsigned char *c = (const unsigned char *)p;
    if (c < g_smem || c >= g_smem + g_smem_size) { if (g_wmma_violations++ < 10) fprintf(stderr, "%s: element outside smem (off %ld of %zu)\n", what, (long)(c - g_smem), g_smem_size); }
}
namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {}; struct matrix_a {}; struct matrix_b {}; struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { float x[256]; };
template <class L> constexpr bool is_col() { return std::is_same<L, col_major>::value; }
template <class Use, class L> void load_matrix_sync(fragment<Use, 16, 16, 16, bf16, L> &f, const bf16 *p, unsigned ld) {
    chk_ptr(p, ld, 2, "load bf16");
    for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) {
        const bf16 *e = is_col<L>() ? p + i + (size_t)j * ld : p + (size_t)i * ld + j;
        chk_elem(e, "load bf16"); f.x[i * 16 + j] = __bfloat162float(*e);
    }
}
static inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ld, layout_t l) {
    chk_ptr(p, ld, 4, "load acc");
    for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) {
        const float *e = l == mem_col_major ? p + i + (size_t)j * ld : p + (size_t)i * ld + j;
        chk_elem(e, "load acc"); f.x[i * 16 + j] = *e;
    }
}
static inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ld, layout_t l) {
    chk_ptr(p, ld, 4, "store acc");
    for (int e = g_cur & 31; e < 256; e += 32) { // this lane's share
        int i = e / 16, j = e % 16;
        float *q = l == mem_col_major ? p + i + (size_t)j * ld : p + (size_t)i * ld + j;
        chk_elem(q, "store acc"); *q = f.x[e];
    }
}
static inline void fill_fragment(fragment<accumulator, 16, 16, 16, float> &f, float v) { for (int i = 0; i < 256; i++) f.x[i] = v; }
template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, bf16, LA> &a,
              const fragment<matrix_b, 16, 16, 16, bf16, LB> &b, const fragment<accumulator, 16, 16, 16, float> &c) {
    float t[256];
    for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) {
        float s = c.x[i * 16 + j];
        for (int k = 0; k < 16; k++) s += a.x[i * 16 + k] * b.x[k * 16 + j];
        t[i * 16 + j] = s;
    }
    memcpy(d.x, t, sizeof t);
}
}} // namespace

// ---- launch ----
extern int g_order; // 0 ascending, 1 descending, 2 random
void run_block(std::function<void()> body);
void run_kernel(dim3 grid, int block, size_t smem, std::function<void()> body);
#define CK(op, call) (call)
enum cudaFuncAttr_ { cudaFuncAttributeMaxDynamicSharedMemorySize };
extern size_t g_smem_attr;
template <class F> int cudaFuncSetAttribute(F, cudaFuncAttr_, int v) { g_smem_attr = (size_t)v; return 0; }
#define LAUNCH_SMEM(op, grid, block, smem, kernel, ...)                                  \
    do { if ((grid).x > 0 && (grid).y > 0 && (grid).z > 0) run_kernel(grid, block, smem, [=] { kernel(__VA_ARGS__); }); } while (0)
#define LAUNCH(op, grid, block, kernel, ...)                                              \
    do { if ((grid) > 0) run_kernel(dim3(grid), block, 0, [=] { kernel(__VA_ARGS__); }); } while (0)
#define PROF(op)
[[noreturn]] static inline void ml_cuda_die(const char *op, const char *w) { fprintf(stderr, "die %s %s\n", op, w); exit(3); }
void ml_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int H, int hd);
