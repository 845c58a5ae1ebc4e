/* backend_cuda.h: the CUDA backend (kernels/): the op table of core/backend.h on one NVIDIA GPU. */
#ifndef MOELAB_BACKEND_CUDA_H
#define MOELAB_BACKEND_CUDA_H

#include <stddef.h>

#include "backend.h"

/* 1 when a CUDA device can be used (why receives its name), 0 otherwise (why receives the reason). */
int cuda_available(char *why, size_t cap);

/* The first device's memory in bytes, 0 without a usable device (for moelab plan's default). */
size_t cuda_device_memory(void);

/* The CUDA op tables, creating the cuBLAS handle on first use; call only when cuda_available.
 * backend_cuda ("cuda"): bf16 tensor-core GEMMs with fp32 accumulation, fp32 master weights, optimizer state
 * and every other op. backend_cuda_fp32 ("cuda-fp32"): fp32 everywhere, for verification against the CPU. */
const ml_backend *backend_cuda(void);
const ml_backend *backend_cuda_fp32(void);

/* The best of reps n x n x n cuBLAS GEMMs in GFLOP/s: bf16 inputs (fp32 accumulation and output, as the
 * training GEMMs) or fp32 throughout. */
double cuda_gemm_peak(int n, int reps, int bf16_inputs);

/* Per-op timing with CUDA events: between start and stop every table entry records an event pair; stop
 * waits for the device and sums the pairs by op (up to cap ops, in first-seen order); returns their number. */
void cuda_profile_start(void);
int cuda_profile_stop(ml_op_time *out, int cap);

/* device allocations so far (cudaMalloc calls, the workspace's included): constant across steps when the
 * model's prepare() sized the scratch */
long cuda_alloc_count(void);
/* Memory planning without a GPU (moelab plan): what the cuda (bf16_table = 1) or cuda-fp32 table allocates
 * beyond model_init's arrays for a model that model_init plans as p, with nparams parameters: scratch = the
 * workspace prepare() sizes plus the op groups' fixed buffers, weight_copy = the weights' bf16 shadow (cuda).
 * Assumes cuBLAS 13.0's grouped GEMM forms (bf16 outputs) and reads the same environment the tables do. */
void cuda_plan_memory(const ml_backend_plan *p, size_t nparams, int bf16_table, size_t *scratch,
                      size_t *weight_copy);
/* the attention state each layer saves (attention_state_floats of both tables) */
size_t cuda_attention_state_floats(int B, int T, int H);
/* bytes in use on the device (by this process and any other: cudaMemGetInfo) and its total */
void cuda_memory_in_use(size_t *used, size_t *total);

/* The experts' GEMMs: 1 = cublasGemmGroupedBatchedEx (the default; MOELAB_GROUPED_GEMM=loop turns it off),
 * 0 = one GEMM per expert. active(bf16_inputs) is 0 when that path is off or cuBLAS refused every grouped
 * form for that precision (it says so once on stderr per refusal) and the loop took over. */
void cuda_set_grouped_gemm(int on);
int cuda_grouped_gemm_active(int bf16_inputs);
/* how the experts run now in that precision: "grouped fp32", "grouped bf16", "grouped bf16 (bf16 outputs; tf32
 * weight gradients)", "grouped tf32 (bf16 refused)", or "one fp32|bf16 GEMM per expert"; cuda_set_grouped_gemm(1)
 * forgets refusals and asks cuBLAS again which grouped forms it takes */
const char *cuda_grouped_gemm_path(int bf16_inputs);
/* The bf16 table's expert weight gradients: 1 = moelab's tensor-core kernel accumulating into the fp32 gradient
 * (the default; the path's name then ends "; weight gradients by moelab's kernel"; layers whose N or K is not a
 * multiple of 8 still take cuBLAS's form), 0 = the cuBLAS form of the path above (MOELAB_EXPERT_WGRAD=cublas at
 * start-up). */
void cuda_set_expert_wgrad(int own);
/* The bf16 table's expert forward and input-gradient GEMMs: 1 = moelab's tensor-core kernel writing fp32
 * outputs (MOELAB_EXPERT_MATMUL=moelab at start-up; the path's name then starts "forward and input gradient by
 * moelab's kernel"), 0 = cuBLAS's grouped forms (the default until the kernel has been timed on a GPU). */
void cuda_set_expert_matmul(int own);
/* Tests: the bf16 attention backward's dS workspace per chunk and the fewest backward blocks a chunk may have
 * (defaults 512 MB and 512; 0: no floor), and dq by a strided batch per query head (1) instead of one
 * pointer-array batch per band (0, the default); the latter returns the previous setting. */
void cuda_attention_set_ds_budget(size_t bytes, int min_blocks);
int cuda_attention_set_dq_strided(int on);

#endif
