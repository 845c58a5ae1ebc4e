// gemm_cuda.cu: the GEMMs through cuBLAS. Row-major operands are seen by column-major cuBLAS as their
// transposes. Two precisions:
//   fp32  cublasSgemm without TF32: the verification mode, op for op against the CPU;
//   bf16  cublasGemmEx with bf16 inputs on tensor cores, fp32 accumulation and fp32 outputs. Weights come from
//         the bf16 shadow of the fp32 master weights (runtime_cuda.cu; refreshed by AdamW), activations and
//         output gradients are rounded to bf16 into the workspace just before the GEMM.
// The experts' GEMMs go through cublasGemmGroupedBatchedEx (one group per expert that received tokens; empty
// experts are left out, so their weight gradients are never touched). cuBLAS 13.0 on an H100 refuses bf16
// inputs with fp32 outputs there (measured 2026-11-23) but takes bf16 outputs: the bf16 table's experts then
// write bf16 and a cast (or add) widens them into the fp32 result, while the weight gradients, which accumulate,
// run as grouped TF32 GEMMs on the fp32 operands. Which forms cuBLAS takes is asked once at start-up (a 16^3
// probe, again on cuda_set_grouped_gemm(1)); a refusal later still moves on: bf16 -> bf16 outputs -> TF32 ->
// one GEMM per expert. The bf16 table's weight gradients do not take that route by default: moelab's own
// kernel (expert_wgrad.cu) accumulates bf16 products into the fp32 gradient; MOELAB_EXPERT_WGRAD=cublas (or
// cuda_set_expert_wgrad(0)) sends them down the cuBLAS forms above, for comparison. The forward and input
// gradient can take moelab's kernel too (expert_matmul.cu: fp32 outputs directly), opt-in until timed on a GPU:
// MOELAB_EXPERT_MATMUL=moelab or cuda_set_expert_matmul(1).
#include "cuda_common.cuh"

void ml_cast_bf16(const char *op, bf16 *dst, const float *src, size_t n); // runtime_cuda.cu
void ml_expert_wgrad(const char *op, float *dw, const bf16 *dout, const bf16 *inp, const int32_t *offsets,
                     const int32_t *offsets_host, int E, int N, int K, int fresh); // expert_wgrad.cu
void ml_expert_matmul(const char *op, int dinp, float *out, const bf16 *a, const bf16 *w, const int32_t *offsets,
                      const int32_t *offsets_host, int32_t *tile_start, int E, int N, int K); // expert_matmul.cu
static int own_wgrad = 1, own_matmul = 0;
extern "C" void cuda_set_expert_wgrad(int own) { own_wgrad = own; }
extern "C" void cuda_set_expert_matmul(int own) { own_matmul = own; }
static int32_t *tile_start; // device scratch for expert_matmul.cu: MAX_GROUPS + 1 ints

// the experts' path for each table ([0] fp32, [1] bf16): fastest first, moved on when cuBLAS refuses one
enum { PATH_GROUPED, PATH_BF16OUT, PATH_TF32, PATH_LOOP };
static int grouped_wanted = 1, expert_path[2];
static int path_of(int bf) { return grouped_wanted ? expert_path[bf] : PATH_LOOP; }
extern "C" int cuda_grouped_gemm_active(int bf16_inputs) { return path_of(!!bf16_inputs) != PATH_LOOP; }
static const char *cublas_path_name(int bf16_inputs);
extern "C" const char *cuda_grouped_gemm_path(int bf16_inputs) {
    if (!bf16_inputs || !own_matmul) return cublas_path_name(bf16_inputs);
    static char name[200];
    if (own_wgrad) return "forward and input gradient by moelab's kernel; weight gradients by moelab's kernel";
    snprintf(name, sizeof name, "forward and input gradient by moelab's kernel; weight gradients as in cuBLAS's "
             "path: %s", cublas_path_name(1));
    return name;
}
static const char *cublas_path_name(int bf16_inputs) {
    static const char *const names[3][4] = {
        {"grouped fp32", "", "", "one fp32 GEMM per expert"},
        {"grouped bf16", "grouped bf16 (bf16 outputs; tf32 weight gradients)", "grouped tf32 (bf16 refused)",
         "one bf16 GEMM per expert"},
        {"grouped bf16; weight gradients by moelab's kernel", "grouped bf16 (bf16 outputs); weight gradients by "
         "moelab's kernel", "grouped tf32 (bf16 refused); weight gradients by moelab's kernel", "one bf16 GEMM "
         "per expert; weight gradients by moelab's kernel"}};
    return names[bf16_inputs ? 1 + own_wgrad : 0][path_of(!!bf16_inputs)];
}

// An operand as cuBLAS gets it: a pointer and its type.
struct operand {
    const void *p;
    cudaDataType_t t;
};

// What the activation slots hold: the bf16 rounding of src[0..n) as of epoch (cuda_common.cuh: no table entry
// other than a dense GEMM, and no write to memory, has run since).
struct cast_memo {
    const float *src;
    size_t n;
    const void *dst;
    unsigned long epoch;
};
static cast_memo memo[WS_CAST_B + 1];
// activation x (n floats) in the compute precision: itself in fp32, its bf16 rounding in workspace slot (WS_CAST_A
// or WS_CAST_B; the dense GEMMs pass reuse = 1: a rounding of x still in the slot is taken as it is)
static operand act(const char *op, const float *x, size_t n, int bf, int slot, int reuse = 0) {
    if (!bf) return operand{x, CUDA_R_32F};
    bf16 *dst = (bf16 *)ml_ws(slot, sizeof(bf16) * (n ? n : 1));
    cast_memo *m = slot <= WS_CAST_B ? &memo[slot] : NULL;
    if (reuse && m && m->src == x && m->n == n && m->dst == dst && m->epoch == ml_epoch)
        return operand{dst, CUDA_R_16BF};
    ml_cast_bf16(op, dst, x, n);
    if (m) *m = cast_memo{x, n, dst, ml_epoch};
    return operand{dst, CUDA_R_16BF};
}
// a dense GEMM wrote out[0..n): roundings of memory it overlaps are stale
static void written(const float *out, size_t n) {
    for (cast_memo &m : memo)
        if (m.src && m.src < out + n && out < m.src + m.n) m = cast_memo{};
}
// weight w (n floats): its bf16 shadow when bound, else rounded into the weight slot
static operand weight(const char *op, const float *w, size_t n, int bf) {
    if (!bf) return operand{w, CUDA_R_32F};
    const bf16 *s = ml_shadow_of(w, n);
    if (s) return operand{s, CUDA_R_16BF};
    return act(op, w, n, 1, WS_CAST_W);
}
static size_t elt(operand o) { return o.t == CUDA_R_16BF ? sizeof(bf16) : sizeof(float); }

// C(m x n, column-major, fp32) = op(A) op(B) + beta C
static void gemm(const char *op, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, operand A, int lda,
                 operand B, int ldb, float beta, float *C, int ldc) {
    const float one = 1;
    if (A.t == CUDA_R_32F)
        BK(op, cublasSgemm(ml_blas, ta, tb, m, n, k, &one, (const float *)A.p, lda, (const float *)B.p, ldb, &beta, C,
                           ldc));
    else
        BK(op, cublasGemmEx(ml_blas, ta, tb, m, n, k, &one, A.p, A.t, lda, B.p, B.t, ldb, &beta, C, CUDA_R_32F, ldc,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---- dense ----

template <int BF> static void matmul_forward(float *out, const float *inp, const float *w, int M, int K, int N) {
    PROF("matmul_forward");
    if (M == 0) return;
    // out(M,N) = inp(M,K) @ w(N,K)^T  <=>  out^T(N,M) = w^T... as column-major: C(N,M) = W^T(N,K) X(K,M)
    operand W = weight("matmul_forward", w, (size_t)N * K, BF);
    operand X = act("matmul_forward", inp, (size_t)M * K, BF, WS_CAST_A, 1);
    gemm("matmul_forward", CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, W, K, X, K, 0, out, N);
    written(out, (size_t)M * N);
}
template <int BF>
static void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, int M, int K,
                            int N) {
    PROF("matmul_backward");
    if (M == 0) return;
    // the q, k and v projections share inp: its rounding is made once (act's reuse)
    operand G = act("matmul_backward", dout, (size_t)M * N, BF, WS_CAST_B, 1);
    operand X = act("matmul_backward", inp, (size_t)M * K, BF, WS_CAST_A, 1);
    if (dinp) { // dinp(M,K) += dout(M,N) @ w(N,K)
        operand W = weight("matmul_backward", w, (size_t)N * K, BF);
        gemm("matmul_backward", CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, W, K, G, N, 1, dinp, K);
    }
    // dw(N,K) += dout(M,N)^T @ inp(M,K)
    gemm("matmul_backward", CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, X, K, G, N, 1, dw, K);
    if (dinp) written(dinp, (size_t)M * K);
    written(dw, (size_t)N * K);
}

// ---- grouped (experts) ----

// Where each expert's operand starts: base + per_expert * e + per_row * offsets[e] (bytes).
struct ptr_rule {
    const char *base;
    long long per_expert, per_row;
};
enum { MAX_GROUPS = ML_CUDA_MAX_E };
static void **group_ptrs; // device: A, B, C arrays of MAX_GROUPS pointers each

// the pointer arrays of the non-empty experts, in expert order (the host builds the same list): a thread per
// expert, its place among the non-empty ones from a block-wide prefix count (one block, E <= blockDim.x)
__global__ void k_group_ptrs(void **ptrs, const int32_t *offsets, int E, ptr_rule a, ptr_rule b, ptr_rule c) {
    __shared__ int count[MAX_GROUPS];
    const int e = threadIdx.x;
    const int32_t lo = e < E ? offsets[e] : 0, has = e < E && offsets[e + 1] != lo;
    count[e] = has;
    __syncthreads();
    block_inclusive_scan(count);
    if (!has) return;
    const int g = count[e] - 1;
    ptrs[g] = (void *)(a.base + a.per_expert * e + a.per_row * lo);
    ptrs[MAX_GROUPS + g] = (void *)(b.base + b.per_expert * e + b.per_row * lo);
    ptrs[2 * MAX_GROUPS + g] = (void *)(c.base + c.per_expert * e + c.per_row * lo);
}

// One expert GEMM shape: C_e = op(A_e) op(B_e) + beta C_e, with m, n or k equal to the expert's rows.
enum { ROWS_M = 1, ROWS_N = 2, ROWS_K = 4 };
struct group_shape {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc, rows_in; // rows_in: which of m, n, k is the expert's row count
    float beta;
};

// How one grouped call runs: operand and output types and the compute type; LOOP is one GEMM per expert.
enum form { F_FP32, F_BF16, F_BF16OUT, F_TF32, F_LOOP };
static form form_of(int bf16_table, int weight_grad) {
    switch (path_of(bf16_table)) {
    case PATH_GROUPED: return bf16_table ? F_BF16 : F_FP32;
    case PATH_BF16OUT: return weight_grad ? F_TF32 : F_BF16OUT; // accumulating into fp32 needs fp32 outputs
    case PATH_TF32: return F_TF32;
    default: return F_LOOP;
    }
}
static int bf16_operands(int bf16_table, form f) { return f == F_BF16 || f == F_BF16OUT || (f == F_LOOP && bf16_table); }

// dst = src + beta dst (beta 0 does not read dst): four elements a thread (8-byte loads, 16-byte stores) when
// dst is 16-byte and src 8-byte aligned, the n % 4 last one a thread; else one a thread throughout
__device__ __forceinline__ float widen_one(float d, bf16 s, float beta) {
    return beta != 0 ? beta * d + __bfloat162float(s) : __bfloat162float(s);
}
__global__ void k_widen(float *dst, const bf16 *src, size_t n, float beta, int x4) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, n4 = x4 ? n / 4 : 0;
    if (i < n4) {
        const uint2 s = ((const uint2 *)src)[i];
        const bf16 *h = (const bf16 *)&s;
        float4 d = beta != 0 ? ((const float4 *)dst)[i] : make_float4(0, 0, 0, 0);
        d.x = widen_one(d.x, h[0], beta), d.y = widen_one(d.y, h[1], beta), d.z = widen_one(d.z, h[2], beta);
        d.w = widen_one(d.w, h[3], beta);
        ((float4 *)dst)[i] = d;
    } else if (i - n4 < n - 4 * n4) {
        const size_t e = 4 * n4 + (i - n4);
        dst[e] = beta != 0 ? widen_one(dst[e], src[e], beta) : __bfloat162float(src[e]);
    }
}

// what the start-up probe found cuBLAS takes, and the bf16 table's next path once form f was refused anyway
static int takes_bf16out, takes_tf32;
static int path_after_refusal(form f) {
    if (f == F_BF16 && takes_bf16out && takes_tf32) return PATH_BF16OUT;
    if ((f == F_BF16 || f == F_BF16OUT) && takes_tf32) return PATH_TF32;
    return PATH_LOOP;
}

// C_e = op(A_e) op(B_e) + beta C_e for every expert with rows (offsets on the device, off the host's copy), A
// and B in the form's operand type. F_BF16OUT takes only C laid out as consecutive rows (per_expert 0): the
// products go to a bf16 copy of that layout in the workspace and are widened (beta 0) or added (beta 1) into C.
static void grouped(const char *op, int bf16_table, form f, const group_shape &s, operand A, ptr_rule ra,
                    operand B, ptr_rule rb, float *C, ptr_rule rc, const int32_t *offsets_dev, const int32_t *off,
                    int E) {
    static int m[MAX_GROUPS], n[MAX_GROUPS], k[MAX_GROUPS], lda[MAX_GROUPS], ldb[MAX_GROUPS], ldc[MAX_GROUPS];
    static int size[MAX_GROUPS];
    static cublasOperation_t ta[MAX_GROUPS], tb[MAX_GROUPS];
    static float alpha[MAX_GROUPS], beta[MAX_GROUPS];
    const float out_beta = f == F_BF16OUT ? 0 : s.beta;
    int groups = 0;
    for (int e = 0; e < E; e++) {
        const int rows = off[e + 1] - off[e];
        if (rows == 0) continue;
        m[groups] = s.rows_in == ROWS_M ? rows : s.m;
        n[groups] = s.rows_in == ROWS_N ? rows : s.n;
        k[groups] = s.rows_in == ROWS_K ? rows : s.k;
        lda[groups] = s.lda, ldb[groups] = s.ldb, ldc[groups] = s.ldc, size[groups] = 1;
        ta[groups] = s.ta, tb[groups] = s.tb, alpha[groups] = 1, beta[groups] = out_beta;
        groups++;
    }
    if (groups == 0) return;
    ra.base = (const char *)A.p, rb.base = (const char *)B.p, rc.base = (const char *)C;
    if (f != F_LOOP) {
        bf16 *tmp = NULL;
        const size_t out_n = (size_t)off[E] * s.ldc; // F_BF16OUT: the rows of every expert, in order
        ptr_rule rg = rc;
        if (f == F_BF16OUT) {
            if (rc.per_expert != 0) ml_cuda_die(op, "bf16 outputs need C as consecutive rows");
            tmp = (bf16 *)ml_ws(WS_GROUPED_OUT, sizeof(bf16) * out_n);
            rg = ptr_rule{(const char *)tmp, rc.per_expert / 2, rc.per_row / 2};
        }
        LAUNCH(op, 1, (E + 31) / 32 * 32, k_group_ptrs, group_ptrs, offsets_dev, E, ra, rb, rg);
        const cublasComputeType_t ct = f == F_TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
        const cublasStatus_t st = cublasGemmGroupedBatchedEx(
            ml_blas, ta, tb, m, n, k, alpha, (const void *const *)group_ptrs, A.t, lda,
            (const void *const *)(group_ptrs + MAX_GROUPS), B.t, ldb, beta, group_ptrs + 2 * MAX_GROUPS,
            f == F_BF16OUT ? CUDA_R_16BF : CUDA_R_32F, ldc, groups, size, ct);
        if (st == CUBLAS_STATUS_SUCCESS) {
            if (f == F_BF16OUT) {
                const int x4 = (uintptr_t)C % 16 == 0 && (uintptr_t)tmp % 8 == 0;
                LAUNCH(op, ml_blocks(x4 ? out_n / 4 + out_n % 4 : out_n), 256, k_widen, C, tmp, out_n, s.beta, x4);
            }
            return;
        }
        if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) BK(op, st);
        expert_path[bf16_table] = bf16_table ? path_after_refusal(f) : PATH_LOOP;
        fprintf(stderr, "moelab cuda: %s: cublasGemmGroupedBatchedEx refused %s (%s); the experts run as %s "
                "from now on\n", op, f == F_TF32 ? "TF32" : f == F_BF16OUT ? "bf16 outputs" : f == F_BF16 ?
                "bf16 inputs" : "fp32 inputs", cublasGetStatusString(st), cuda_grouped_gemm_path(bf16_table));
    }
    for (int e = 0, g = 0; e < E; e++) { // this call's operands, one GEMM per expert into C itself
        if (off[e + 1] == off[e]) continue;
        operand Ae{ra.base + ra.per_expert * e + ra.per_row * off[e], A.t};
        operand Be{rb.base + rb.per_expert * e + rb.per_row * off[e], B.t};
        float *Ce = (float *)(rc.base + rc.per_expert * e + rc.per_row * off[e]);
        gemm(op, s.ta, s.tb, m[g], n[g], k[g], Ae, s.lda, Be, s.ldb, s.beta, Ce, s.ldc);
        g++;
    }
}

// whether expert_matmul.cu takes these weights: its cp.async reads need them 16-byte aligned, which a bf16 shadow
// is not when the tensor's offset in the parameter arena is not a multiple of 8 floats (e.g. QK-norm weights of
// a head size of 10 before it); such layers stay on cuBLAS's path
static int own_matmul_for(int N, int K, const operand &W) {
    return N % 8 == 0 && K % 8 == 0 && (uintptr_t)W.p % 16 == 0;
}
// the host's copy of the offsets (E + 1 ints; the routed rows are the last)
static const int32_t *host_offsets(const char *op, const int32_t *offsets, int E) {
    if (E > MAX_GROUPS) ml_cuda_die(op, "more than 1024 experts");
    return ml_offsets_host(op, offsets, E);
}

template <int BF>
static void grouped_matmul_forward(float *out, const float *inp, const float *w, const int32_t *offsets, int E, int K,
                                   int N) {
    PROF("grouped_matmul_forward");
    const char *op = "grouped_matmul_forward";
    const int32_t *off = host_offsets(op, offsets, E);
    const int rows = off[E];
    if (rows == 0) return;
    // expert e: out_e(n_e,N) = inp_e(n_e,K) @ w_e(N,K)^T: column-major C(N,n_e) = W_e^T X_e
    if (BF && own_matmul) { // fp32 outputs from bf16 mma (expert_matmul.cu)
        const operand W = weight(op, w, (size_t)E * N * K, 1);
        if (own_matmul_for(N, K, W)) {
            const operand X = act(op, inp, (size_t)rows * K, 1, WS_CAST_A);
            ml_expert_matmul(op, 0, out, (const bf16 *)X.p, (const bf16 *)W.p, offsets, off, tile_start, E, N, K);
            return;
        }
    }
    const form f = form_of(BF, 0);
    const int bf = bf16_operands(BF, f);
    operand W = weight(op, w, (size_t)E * N * K, bf), X = act(op, inp, (size_t)rows * K, bf, WS_CAST_A);
    group_shape s{CUBLAS_OP_T, CUBLAS_OP_N, N, 0, K, K, K, N, ROWS_N, 0};
    grouped(op, BF, f, s, W, ptr_rule{0, (long long)elt(W) * N * K, 0}, X, ptr_rule{0, 0, (long long)elt(X) * K},
            out, ptr_rule{0, 0, (long long)sizeof(float) * N}, offsets, off, E);
}
template <int BF>
static void grouped_matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                    const int32_t *offsets, int E, int K, int N) {
    PROF("grouped_matmul_backward");
    const char *op = "grouped_matmul_backward";
    const int32_t *off = host_offsets(op, offsets, E);
    const int rows = off[E];
    // dw's zeroing deferred to here (zero_deferred): moelab's kernel writes it whole; the other paths zero it now
    const int fresh = ml_deferred_zero_take(dw, sizeof(float) * E * N * K);
    const int own = BF && own_wgrad && N % 8 == 0 && K % 8 == 0;
    if (fresh && (!own || rows == 0)) CK(op, cudaMemsetAsync(dw, 0, sizeof(float) * E * N * K));
    if (rows == 0) return; // every expert empty: no gradient anywhere
    operand G{dout, CUDA_R_32F}; // the output gradient, rounded to bf16 at most once
    const operand Wm = dinp && BF && own_matmul ? weight(op, w, (size_t)E * N * K, 1) : operand{NULL, CUDA_R_16BF};
    if (dinp && BF && own_matmul && own_matmul_for(N, K, Wm)) { // fp32 += bf16 mma (expert_matmul.cu)
        G = act(op, dout, (size_t)rows * N, 1, WS_CAST_B);
        ml_expert_matmul(op, 1, dinp, (const bf16 *)G.p, (const bf16 *)Wm.p, offsets, off, tile_start, E, N, K);
    } else if (dinp) { // dinp_e(n_e,K) += dout_e(n_e,N) @ w_e(N,K): column-major C(K,n_e) = W_e(K,N) G_e(N,n_e)
        const form f = form_of(BF, 0);
        const int bf = bf16_operands(BF, f);
        G = act(op, dout, (size_t)rows * N, bf, WS_CAST_B);
        operand W = weight(op, w, (size_t)E * N * K, bf);
        group_shape s{CUBLAS_OP_N, CUBLAS_OP_N, K, 0, N, K, N, K, ROWS_N, 1};
        grouped(op, BF, f, s, W, ptr_rule{0, (long long)elt(W) * N * K, 0}, G, ptr_rule{0, 0, (long long)elt(G) * N},
                dinp, ptr_rule{0, 0, (long long)sizeof(float) * K}, offsets, off, E);
    }
    if (own) { // bf16 products into the fp32 dw (expert_wgrad.cu)
        if (G.t != CUDA_R_16BF) G = act(op, dout, (size_t)rows * N, 1, WS_CAST_B);
        const operand X = act(op, inp, (size_t)rows * K, 1, WS_CAST_A);
        ml_expert_wgrad(op, dw, (const bf16 *)G.p, (const bf16 *)X.p, offsets, off, E, N, K, fresh);
        return;
    }
    // dw_e(N,K) += dout_e^T @ inp_e: column-major C(K,N) = X_e(K,n_e) G_e^T(n_e,N); k = n_e
    const form f = form_of(BF, 1); // after the dinp call: a refusal there may have moved the path on
    const int bf = bf16_operands(BF, f);
    if ((G.t == CUDA_R_16BF) != bf) G = act(op, dout, (size_t)rows * N, bf, WS_CAST_B);
    operand X = act(op, inp, (size_t)rows * K, bf, WS_CAST_A);
    group_shape s{CUBLAS_OP_N, CUBLAS_OP_T, K, N, 0, K, N, K, ROWS_K, 1};
    grouped(op, BF, f, s, X, ptr_rule{0, 0, (long long)elt(X) * K}, G, ptr_rule{0, 0, (long long)elt(G) * N}, dw,
            ptr_rule{0, (long long)sizeof(float) * N * K, 0}, offsets, off, E);
}

// Which grouped forms cuBLAS takes: one 16^3 product per form, on scratch (A, B, C of 16 x 16 floats each).
static void **probe_ptrs;
static int takes(cudaDataType_t in, cudaDataType_t out, cublasComputeType_t ct) {
    static const cublasOperation_t t = CUBLAS_OP_N;
    static const int d = 16, one = 1;
    static const float alpha = 1, beta = 0;
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(ml_blas, &t, &t, &d, &d, &d, &alpha,
                                                         (const void *const *)probe_ptrs, in, &d,
                                                         (const void *const *)(probe_ptrs + 1), in, &d, &beta,
                                                         probe_ptrs + 2, out, &d, 1, &one, ct);
    if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE)
        BK("grouped_matmul (probe)", st);
    return st == CUBLAS_STATUS_SUCCESS;
}
static void probe_paths(void) {
    expert_path[0] = takes(CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F) ? PATH_GROUPED : PATH_LOOP;
    takes_bf16out = takes(CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F);
    takes_tf32 = takes(CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32);
    expert_path[1] = takes(CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F) ? PATH_GROUPED
                     : takes_bf16out && takes_tf32                      ? PATH_BF16OUT
                     : takes_tf32                                       ? PATH_TF32
                                                                        : PATH_LOOP;
    CK("grouped_matmul (probe)", cudaDeviceSynchronize());
}
extern "C" void cuda_set_grouped_gemm(int on) {
    grouped_wanted = on;
    if (on) probe_paths();
}
int ml_grouped_bf16_outputs(void) { return path_of(1) == PATH_BF16OUT; }

// the device buffers ml_cuda_gemm_init allocates once (ml_gemm_fixed_bytes counts them for cuda_plan_memory)
static const size_t group_ptrs_bytes = sizeof(void *) * 3 * MAX_GROUPS,
                    tile_start_bytes = sizeof(int32_t) * (MAX_GROUPS + 1), probe_bytes = 3 * 16 * 16 * sizeof(float),
                    probe_ptrs_bytes = sizeof(void *) * 3;
size_t ml_gemm_fixed_bytes(void) { return group_ptrs_bytes + tile_start_bytes + probe_bytes + probe_ptrs_bytes; }
int ml_grouped_bf16_outputs_planned(void) {
    const char *env = getenv("MOELAB_GROUPED_GEMM");
    return !(env && !strcmp(env, "loop")); // cuBLAS 13.0 (H100) takes bf16 outputs, not bf16 in / fp32 out
}

void ml_cuda_gemm_init(void) {
    if (!group_ptrs) CK("grouped_matmul", cudaMalloc(&group_ptrs, group_ptrs_bytes));
    if (!tile_start) CK("grouped_matmul", cudaMalloc(&tile_start, tile_start_bytes));
    if (!probe_ptrs) {
        char *scratch;
        CK("grouped_matmul", cudaMalloc(&scratch, probe_bytes));
        CK("grouped_matmul", cudaMemset(scratch, 0, probe_bytes));
        void *p[3] = {scratch, scratch + 1024, scratch + 2048};
        static_assert(sizeof p == probe_ptrs_bytes, "three probe pointers");
        CK("grouped_matmul", cudaMalloc(&probe_ptrs, probe_ptrs_bytes));
        CK("grouped_matmul", cudaMemcpy(probe_ptrs, p, sizeof p, cudaMemcpyHostToDevice));
    }
    const char *env = getenv("MOELAB_GROUPED_GEMM");
    grouped_wanted = !(env && !strcmp(env, "loop"));
    const char *wg = getenv("MOELAB_EXPERT_WGRAD");
    own_wgrad = !(wg && !strcmp(wg, "cublas"));
    const char *mm = getenv("MOELAB_EXPERT_MATMUL");
    own_matmul = mm && !strcmp(mm, "moelab");
    probe_paths();
}

void ml_cuda_fill_gemms(ml_backend *b, int bf16_compute) {
    if (bf16_compute) {
        b->matmul_forward = matmul_forward<1>, b->matmul_backward = matmul_backward<1>;
        b->grouped_matmul_forward = grouped_matmul_forward<1>;
        b->grouped_matmul_backward = grouped_matmul_backward<1>;
    } else {
        b->matmul_forward = matmul_forward<0>, b->matmul_backward = matmul_backward<0>;
        b->grouped_matmul_forward = grouped_matmul_forward<0>;
        b->grouped_matmul_backward = grouped_matmul_backward<0>;
    }
}
