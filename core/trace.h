/* trace.h: the per-run HDF5 load trace (runs/<run>/trace.h5), schema version ML_TRACE_SCHEMA. Every logged
 * step appends one row to extendible, chunked, compressed datasets; evaluations append to /eval. The writer
 * buffers rows in memory and writes them at trace_flush, opening and closing the file each time, so between
 * flushes the file is closed and complete: readable by h5py/h5dump while the run goes on, and intact after a
 * kill -9 up to the last flush (space is never reused, so even a kill inside a flush leaves the last
 * flushed state readable: docs/formats.md). Layout (N
 * logged steps, K evaluations, L layers, E experts):
 *   /step (N) int64, /tokens (N) int64, /loss (N) f32, /lr (N) f32, /grad_norm (N) f32,
 *   /policy_loss (N,L) f32, /load (N,L,E) int32 (after drops), /selected (N,L,E) int32 (before drops),
 *   /gate_mean (N,L,E) f32, /bias (N,L,E) f32, /topk (N,L) int32, /dropped (N,L) int32,
 *   /eval/step (K) int64, /eval/loss (K) f32, /eval/load (K,L,E) int32, /eval/gate_mean (K,L,E) f32;
 *   root attributes: schema_version (int), run_id (string), config (string: the resolved config.yaml),
 *   layers, experts (int). Dense layers have k = 0 and zero loads. */
#ifndef MOELAB_TRACE_H
#define MOELAB_TRACE_H

#include <stdint.h>

#include "err.h"

#define ML_TRACE_SCHEMA 1

typedef struct ml_trace ml_trace;

/* One logged training step. Arrays are (L) or (L,E) row-major, host memory, copied by trace_append; a NULL
 * array is recorded as zeros. */
typedef struct {
    int64_t step, tokens;
    float loss, lr, grad_norm;
    const float *policy_loss;   /* (L) */
    const int32_t *load;        /* (L,E) */
    const int32_t *selected;    /* (L,E) */
    const float *gate_mean;     /* (L,E) */
    const float *bias;          /* (L,E) */
    const int32_t *topk;        /* (L) */
    const int32_t *dropped;     /* (L) */
} ml_trace_row;

/* Opens the trace for writing. A new run (resume_step < 0) creates path (replacing any file there). A
 * resumed run (resume_step >= 0) reopens it, checks run_id, L and E, and drops rows with step > resume_step
 * (written after the checkpoint the run resumes from), so the trace continues with no duplicate or missing
 * step. Errors (not HDF5, another run's trace, other shape) are ML_EINPUT naming the file. */
int trace_open(ml_trace **t, const char *path, const char *run_id, const char *config_text, int L, int E,
               int64_t resume_step, ml_err *err);
/* Buffers one row in memory (nothing reaches the file before trace_flush). Steps must increase: a step not
 * above the last one appended (or kept on resume) is ML_EINPUT. */
int trace_append(ml_trace *t, const ml_trace_row *row, ml_err *err);
/* Buffers one evaluation: load (L,E), gate_mean (L,E) as in ml_trace_row. */
int trace_append_eval(ml_trace *t, int64_t step, float loss, const int32_t *load, const float *gate_mean,
                      ml_err *err);
/* Writes the buffered rows to the file (open, extend, write, close). A reader holding the file open (HDF5
 * locks it) delays the flush up to 2 s, then it fails. On failure (ML_ERUN) the rows stay buffered and the
 * next flush writes them. */
int trace_flush(ml_trace *t, ml_err *err);
/* Flushes and frees (frees even when the flush fails). NULL is a no-op. */
int trace_close(ml_trace *t, ml_err *err);
/* Frees without flushing: rows appended since the last flush are lost, as in a crash. NULL is a no-op. */
void trace_free(ml_trace *t);

/* ---- reading (moelab trace, plots, tests) */

typedef struct {
    int schema, L, E;
    int64_t nsteps, nevals;
    char run_id[256];
} ml_trace_info;

/* Reads the shape and attributes. A missing, non-HDF5 or foreign file (no schema_version, or a newer
 * schema) gives ML_EINPUT naming the file and what is wrong. */
int trace_info(const char *path, ml_trace_info *info, ml_err *err);
/* The config attribute (malloc'd text). */
int trace_config(const char *path, char **config_text, ml_err *err);
/* Rows [row0, row0+n) of a 1-D dataset ("step", "tokens" as int64; "loss", "lr", "grad_norm" as float). */
int trace_read_i64(const char *path, const char *dataset, int64_t row0, int64_t n, int64_t *out, ml_err *err);
int trace_read_f32(const char *path, const char *dataset, int64_t row0, int64_t n, float *out, ml_err *err);
/* Rows [row0, row0+n) of layer `layer` of an (N,L,E) dataset ("load", "selected" -> int32; "gate_mean",
 * "bias" -> float; "eval/load", "eval/gate_mean" likewise over evaluations) into out (n, E). */
int trace_read_layer_i32(const char *path, const char *dataset, int layer, int64_t row0, int64_t n, int32_t *out,
                         ml_err *err);
int trace_read_layer_f32(const char *path, const char *dataset, int layer, int64_t row0, int64_t n, float *out,
                         ml_err *err);
/* Rows [row0, row0+n) of an (N,L) dataset ("policy_loss" -> float, "topk", "dropped" -> int32) into out (n, L). */
int trace_read_rows_f32(const char *path, const char *dataset, int64_t row0, int64_t n, float *out, ml_err *err);
int trace_read_rows_i32(const char *path, const char *dataset, int64_t row0, int64_t n, int32_t *out, ml_err *err);

#endif
