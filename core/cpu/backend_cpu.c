/* backend_cpu.c: the CPU op table: host memory and the ops of ops_cpu.c. */
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ops_cpu.h"
#include "route_ops_cpu.h"

static void *cpu_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
    memset(p, 0, bytes);
    return p;
}
static void cpu_free(void *p) { free(p); }
static void cpu_memset0(void *p, size_t bytes) { memset(p, 0, bytes); }
static void cpu_copy(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void cpu_sync(void) {}

static void cpu_moe_dispatch(int32_t *counts, int32_t *offsets, int32_t *slot, const int32_t *idx, int M, int k,
                             int E) {
    memset(counts, 0, sizeof(int32_t) * E);
    for (int i = 0; i < M * k; i++)
        if (idx[i] >= 0) counts[idx[i]]++;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    /* stable: within an expert, tokens keep their order */
    int32_t fill[E];
    memcpy(fill, offsets, sizeof(int32_t) * E);
    for (int i = 0; i < M * k; i++) slot[i] = idx[i] >= 0 ? fill[idx[i]]++ : -1;
}

/* the probabilities (B,H,T,T): the backward reads them instead of recomputing */
static size_t cpu_attention_state_floats(int B, int T, int H) { return (size_t)B * H * T * T; }
static void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, float *att,
                                   const float *q, const float *k, const float *v, int B, int T, int H, int KV,
                                   int hd) {
    (void)out;
    attention_backward(dq, dk, dv, dout, att, q, k, v, B, T, H, KV, hd);
}

const ml_backend *backend_cpu(void) {
    static const ml_backend b = {
        .name = "cpu",
        .alloc = cpu_alloc,
        .free = cpu_free,
        .memset0 = cpu_memset0,
        .to_host = cpu_copy,
        .from_host = cpu_copy,
        .sync = cpu_sync,
        .encoder_forward = encoder_forward,
        .encoder_backward = encoder_backward,
        .matmul_forward = matmul_forward,
        .matmul_backward = matmul_backward,
        .rmsnorm_forward = rmsnorm_forward,
        .rmsnorm_backward = rmsnorm_backward,
        .rope_forward = rope_forward,
        .rope_backward = rope_backward,
        .attention_state_floats = cpu_attention_state_floats,
        .attention_forward = attention_forward,
        .attention_backward = cpu_attention_backward,
        .swiglu_forward = swiglu_forward,
        .swiglu_backward = swiglu_backward,
        .add_forward = add_forward,
        .router_forward = router_forward,
        .router_backward = router_backward,
        .route_stats = cpu_route_stats,
        .lbl_backward = cpu_lbl_backward,
        .zloss_forward = cpu_zloss_forward,
        .zloss_backward = cpu_zloss_backward,
        .tempered_forward = cpu_tempered_forward,
        .tempered_backward = cpu_tempered_backward,
        .capacity_route = cpu_capacity_route,
        .moe_dispatch = cpu_moe_dispatch,
        .permute_forward = permute_forward,
        .permute_backward = permute_backward,
        .unpermute_forward = unpermute_forward,
        .unpermute_backward = unpermute_backward,
        .grouped_matmul_forward = grouped_matmul_forward,
        .grouped_matmul_backward = grouped_matmul_backward,
        .crossentropy_forward = crossentropy_forward,
        .crossentropy_backward = crossentropy_backward,
        .adamw_update = adamw_update,
        .sumsq = sumsq,
    };
    return &b;
}
