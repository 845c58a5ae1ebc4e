/* memplan.h: how much memory training a config takes on a backend, before anything is allocated (moelab plan):
 * model_init runs on a dry op table that counts what it would allocate, and the backend adds what it allocates
 * beside the model (its scratch and weight copies). Exact for moelab's own allocations; not counted: the CUDA
 * context, cuBLAS's internal workspace, the allocator's rounding, and host-side buffers. */
#ifndef MOELAB_MEMPLAN_H
#define MOELAB_MEMPLAN_H

#include <stddef.h>

#include "config.h"
#include "err.h"

typedef struct {
    size_t state;       /* fp32 parameters, gradients, AdamW m and v */
    size_t weight_copy; /* the weights' bf16 copy (the cuda table) */
    size_t activations; /* everything else model_init allocates: saved activations, backward and routing buffers */
    size_t scratch;     /* the backend's own workspace and fixed buffers */
} ml_memory_plan;

/* Plans training cfg in micro-batches of B sequences on backend "cpu", "cuda" or "cuda-fp32"; needs no GPU.
 * ML_EINPUT for an invalid config, B < 1, or a backend this build does not have (naming it). */
int memory_plan(const ml_config *cfg, const char *backend, int B, ml_memory_plan *plan, ml_err *err);

size_t memory_plan_total(const ml_memory_plan *plan);

/* The largest B whose plan fits in limit bytes (0 when not even B = 1 does), into *max_B. */
int memory_plan_max_batch(const ml_config *cfg, const char *backend, size_t limit, int *max_B, ml_err *err);

#endif
