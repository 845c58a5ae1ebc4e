// emu_cublas.cpp: cuBLAS as its documentation defines it, for tests/emu: column-major operands,
// C(m x n) = alpha op(A) op(B) + beta C with op(A) m x k and op(B) k x n; beta = 0 ignores C's old values.
// Inputs are fp32 or bf16 (widened to fp32), outputs fp32; the products run in OpenBLAS (column-major sgemm).
#include <cblas.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "cuda_emu.h"

struct ml_emu_blas {
    int unused;
};

// X (rows x cols as stored, column-major, leading dimension ld) as fp32; only its (cols - 1) ld + rows
// elements are read
static const float *widen(const void *X, cudaDataType_t t, int rows, int ld, int cols, std::vector<float> &buf) {
    if (t == CUDA_R_32F) return (const float *)X;
    buf.resize(cols ? (size_t)(cols - 1) * ld + rows : 0);
    for (size_t i = 0; i < buf.size(); i++) buf[i] = __bfloat162float(((const __nv_bfloat16 *)X)[i]);
    return buf.data();
}
static cublasStatus_t gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha,
                           const void *A, cudaDataType_t at, int lda, const void *B, cudaDataType_t bt, int ldb,
                           float beta, float *C, int ldc) {
    const int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
    const int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
    if (m < 0 || n < 0 || k < 0 || ldc < std::max(1, m) || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    if (k == 0) { // C = beta C
        for (int c = 0; c < n; c++)
            for (int r = 0; r < m; r++) C[(size_t)c * ldc + r] = beta == 0 ? 0 : beta * C[(size_t)c * ldc + r];
        return CUBLAS_STATUS_SUCCESS;
    }
    std::vector<float> wa, wb;
    const float *a = widen(A, at, a_rows, lda, a_cols, wa), *b = widen(B, bt, b_rows, ldb, b_cols, wb);
    cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                m, n, k, alpha, a, lda, b, ldb, beta, C, ldc);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasCreate(cublasHandle_t *h) { return *h = new ml_emu_blas(), CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
const char *cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : s == CUBLAS_STATUS_NOT_SUPPORTED ? "CUBLAS_STATUS_NOT_SUPPORTED"
                                                                                             : "CUBLAS_STATUS_INVALID_VALUE";
}
cublasStatus_t cublasSgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc) {
    return gemm(ta, tb, m, n, k, *alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, *beta, C, ldc);
}
cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B,
                            cudaDataType_t bt, int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
    if (ct != CUDA_R_32F || compute != CUBLAS_COMPUTE_32F || at != bt) return CUBLAS_STATUS_NOT_SUPPORTED;
    return gemm(ta, tb, m, n, k, *(const float *)alpha, A, at, lda, B, bt, ldb, *(const float *)beta, (float *)C,
                ldc);
}
// MOELAB_EMU_REFUSE lists forms to refuse as a cuBLAS without them would ("bf16out-grouped", "tf32-grouped",
// "pointer-batched"), so tests can walk the backend's fallbacks. bf16 inputs with fp32 outputs are always refused
// there, as cuBLAS 13.0 on an H100 does.
static bool refused(const char *form) {
    const char *r = getenv("MOELAB_EMU_REFUSE");
    return r && strstr(r, form);
}
// batch GEMMs, operand i at X + i strideX elements
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType_t at, int lda,
                                          long long strideA, const void *B, cudaDataType_t bt, int ldb,
                                          long long strideB, const void *beta, void *C, cudaDataType_t ct, int ldc,
                                          long long strideC, int batch, cublasComputeType_t compute,
                                          cublasGemmAlgo_t algo) {
    if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const size_t ea = at == CUDA_R_32F ? 4 : 2, eb = bt == CUDA_R_32F ? 4 : 2, ec = ct == CUDA_R_32F ? 4 : 2;
    for (int i = 0; i < batch; i++) {
        const cublasStatus_t st = cublasGemmEx(h, ta, tb, m, n, k, alpha, (const char *)A + ea * strideA * i, at, lda,
                                               (const char *)B + eb * strideB * i, bt, ldb, beta,
                                               (char *)C + ec * strideC * i, ct, ldc, compute, algo);
        if (st != CUBLAS_STATUS_SUCCESS) return st;
    }
    return CUBLAS_STATUS_SUCCESS;
}

// batch GEMMs, operand i at X[i] (the pointer arrays in device memory, which the emulator shares with the host)
cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void *alpha, const void *const A[], cudaDataType_t at, int lda,
                                   const void *const B[], cudaDataType_t bt, int ldb, const void *beta, void *const C[],
                                   cudaDataType_t ct, int ldc, int batch, cublasComputeType_t compute,
                                   cublasGemmAlgo_t algo) {
    if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (refused("pointer-batched")) return CUBLAS_STATUS_NOT_SUPPORTED;
    // cuBLAS cannot check pointers held in device memory; with bf16 inputs it wants every matrix 16-byte aligned
    // (a misaligned one may fault on a GPU): stop the test there
    for (int i = 0; i < batch && at == CUDA_R_16BF; i++)
        for (const void *p : {A[i], B[i], (const void *)C[i]})
            if ((uintptr_t)p % 16) {
                fprintf(stderr, "emulated cuBLAS: cublasGemmBatchedEx: problem %d's matrix at %p is not 16-byte "
                                "aligned (bf16 inputs)\n", i, p);
                abort();
            }
    for (int i = 0; i < batch; i++) {
        const cublasStatus_t st = cublasGemmEx(h, ta, tb, m, n, k, alpha, A[i], at, lda, B[i], bt, ldb, beta, C[i], ct,
                                               ldc, compute, algo);
        if (st != CUBLAS_STATUS_SUCCESS) return st;
    }
    return CUBLAS_STATUS_SUCCESS;
}

// X rounded to TF32 (10-bit mantissa, to nearest even) as the tensor cores read it
static const float *tf32(const void *X, int rows, int ld, int cols, std::vector<float> &buf) {
    buf.resize(cols ? (size_t)(cols - 1) * ld + rows : 0);
    for (size_t i = 0; i < buf.size(); i++) {
        uint32_t u;
        memcpy(&u, (const float *)X + i, 4);
        u = (u + 0xfffu + ((u >> 13) & 1)) & ~0x1fffu;
        memcpy(&buf[i], &u, 4);
    }
    return buf.data();
}
// group g: group_size[g] problems sharing its parameters; the pointer arrays list every problem in order
cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t, const cublasOperation_t ta[], const cublasOperation_t tb[],
                                          const int m[], const int n[], const int k[], const void *alpha,
                                          const void *const A[], cudaDataType_t at, const int lda[],
                                          const void *const B[], cudaDataType_t bt, const int ldb[], const void *beta,
                                          void *const C[], cudaDataType_t ct, const int ldc[], int groups,
                                          const int group_size[], cublasComputeType_t compute) {
    const bool is_tf32 = compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    // the forms cuBLAS takes: fp32 (exact or TF32) and bf16 -> bf16 with fp32 compute
    const bool f32 = at == CUDA_R_32F && ct == CUDA_R_32F && (compute == CUBLAS_COMPUTE_32F || is_tf32);
    const bool b16 = at == CUDA_R_16BF && ct == CUDA_R_16BF && compute == CUBLAS_COMPUTE_32F;
    if (at != bt || groups < 0 || !(f32 || b16)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if ((b16 && refused("bf16out-grouped")) || (is_tf32 && refused("tf32-grouped"))) return CUBLAS_STATUS_NOT_SUPPORTED;
    int p = 0;
    std::vector<float> ra, rb, rc;
    for (int g = 0; g < groups; g++)
        for (int i = 0; i < group_size[g]; i++, p++) {
            const void *a = A[p], *b = B[p];
            if (is_tf32) {
                const bool an = ta[g] == CUBLAS_OP_N, bn = tb[g] == CUBLAS_OP_N;
                a = tf32(a, an ? m[g] : k[g], lda[g], an ? k[g] : m[g], ra);
                b = tf32(b, bn ? k[g] : n[g], ldb[g], bn ? n[g] : k[g], rb);
            }
            const float al = ((const float *)alpha)[g], be = ((const float *)beta)[g];
            if (!b16) {
                cublasStatus_t s = gemm(ta[g], tb[g], m[g], n[g], k[g], al, a, at, lda[g], b, bt, ldb[g], be,
                                        (float *)C[p], ldc[g]);
                if (s != CUBLAS_STATUS_SUCCESS) return s;
                continue;
            }
            // bf16 C: computed in fp32 (from C's old values when beta != 0), rounded to bf16 once
            __nv_bfloat16 *c = (__nv_bfloat16 *)C[p];
            const size_t cn = n[g] ? (size_t)(n[g] - 1) * ldc[g] + m[g] : 0;
            rc.assign(cn, 0.f);
            if (be != 0)
                for (size_t j = 0; j < cn; j++) rc[j] = __bfloat162float(c[j]);
            cublasStatus_t s = gemm(ta[g], tb[g], m[g], n[g], k[g], al, a, at, lda[g], b, bt, ldb[g], be, rc.data(),
                                    ldc[g]);
            if (s != CUBLAS_STATUS_SUCCESS) return s;
            for (int col = 0; col < n[g]; col++)
                for (int r = 0; r < m[g]; r++) c[(size_t)col * ldc[g] + r] = __float2bfloat16_rn(rc[(size_t)col * ldc[g] + r]);
        }
    return CUBLAS_STATUS_SUCCESS;
}
