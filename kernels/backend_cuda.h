/* backend_cuda.h: the CUDA backend (kernels/ops_cuda.cu): the op table of core/backend.h on one NVIDIA GPU. */
#ifndef MOELAB_BACKEND_CUDA_H
#define MOELAB_BACKEND_CUDA_H

#include <stddef.h>

#include "backend.h"

/* 1 when a CUDA device can be used (why receives its name), 0 otherwise (why receives the reason). */
int cuda_available(char *why, size_t cap);

/* The CUDA op table (fp32), creating the cuBLAS handle on first use. Call only when cuda_available. */
const ml_backend *backend_cuda(void);

/* The best of reps fp32 cuBLAS GEMMs of n x n x n, in GFLOP/s (the peak moelab bench compares with). */
double cuda_sgemm_peak(int n, int reps);

#endif
