/* train.h: the training loop: AdamW with warmup + cosine LR, global-norm clipping, gradient accumulation,
 * periodic validation, checkpoints, a NaN/Inf guard and the progress line. */
#ifndef MOELAB_TRAIN_H
#define MOELAB_TRAIN_H

#include <stdio.h>

#include "config.h"
#include "err.h"

/* Where a run stands, as the progress line shows it (for a caller that draws its own, like moelab sweep). */
typedef struct {
    int step, steps;
    float loss, val_loss; /* val_loss NaN before the first evaluation */
    float maxvio;         /* the worst MoE layer's MaxVio at this step */
    int worst_layer;
    double tokens_per_s, eta_s;
} ml_train_progress;

typedef struct {
    int quiet;          /* no progress output */
    FILE *progress;     /* where progress goes (stdout by default) */
    int stop_after;     /* > 0: checkpoint and return after this many steps of the run (time-sliced jobs) */
    const char *backend; /* "cpu" (NULL), "cuda" or "auto" (backend_select) */
    /* called when the progress line would be drawn (at most 10 times a second, and every log_every steps),
     * even when quiet */
    void (*on_progress)(void *ctx, const ml_train_progress *p);
    void *progress_ctx;
} ml_train_opts;

/* Final numbers of a run. */
typedef struct {
    int steps;
    float train_loss, val_loss, worst_maxvio;
    double tokens_per_s;
} ml_train_result;

/* A duration as "4m02s" or "1h07m" (progress lines). */
void train_fmt_duration(char *buf, size_t n, double seconds);

/* Learning rate at step (0-based): linear warmup to lr, then cosine to lr * min_lr_ratio at train.steps. */
float train_lr(const ml_config *cfg, int step);

/* Runs cfg to train.steps (resuming from run.resume when set). ML_EINPUT for bad config or data,
 * ML_ERUN when training fails (NaN/Inf: the last good checkpoint is kept). */
int train_run(const ml_config *cfg, const ml_train_opts *opts, ml_train_result *res, ml_err *err);

#endif
