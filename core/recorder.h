/* recorder.h: what a training run records outside its checkpoint: one trace row per logged step and one per
 * evaluation (trace.h5, from the model's routing statistics), and its row, metrics, heartbeat and final
 * status in the run database. train.c calls it; it owns the run's id, trace and database handles. */
#ifndef MOELAB_RECORDER_H
#define MOELAB_RECORDER_H

#include <stdint.h>

#include "err.h"
#include "model.h"
#include "rundb.h"
#include "trace.h"

typedef struct {
    char id[128];
    ml_trace *trace;        /* NULL when trace.every = 0 */
    ml_rundb *db;           /* NULL when run.db = "" */
    int L, E;
    int32_t *load, *selected, *topk, *dropped; /* row buffers */
    float *gate_mean, *bias, *policy_loss;
} ml_recorder;

/* Opens the trace (continuing it on resume: resume_step >= 0) and the database row (status running). The
 * run id is run.id or the run folder's name. */
int recorder_open(ml_recorder *r, const ml_config *cfg, const ml_model *m, int64_t resume_step, ml_err *err);

/* Appends the step's routing statistics (m->stats) to the trace when step % trace.every == 0. */
int recorder_step(ml_recorder *r, const ml_config *cfg, const ml_model *m, int64_t step, uint64_t tokens,
                  float loss, float lr, float grad_norm, ml_err *err);
/* Appends the latest evaluation (m->eval_stats) to the trace. */
int recorder_eval(ml_recorder *r, const ml_model *m, int64_t step, float val_loss, ml_err *err);
/* Metrics into the database (and a heartbeat). */
int recorder_metrics(ml_recorder *r, int64_t step, int n, const char *const *keys, const double *values, ml_err *err);
int recorder_summary(ml_recorder *r, const char *key, double value, ml_err *err);
/* Writes buffered trace rows (before every checkpoint, so the trace holds every step the checkpoint has). */
int recorder_flush(ml_recorder *r, ml_err *err);
/* Flushes, records the final status ("finished", "failed", "killed"; error may be NULL) and closes. */
int recorder_close(ml_recorder *r, const char *status, const char *error, ml_err *err);

#endif
