/* checkpoint.h: save and restore everything a run needs to continue bit for bit: parameters, AdamW moments,
 * router selection biases (policy state), the step, the data position and the RNG. Files are written to a
 * temporary name and renamed, so the previous checkpoint survives a crash mid-write. */
#ifndef MOELAB_CHECKPOINT_H
#define MOELAB_CHECKPOINT_H

#include <stdint.h>

#include "err.h"
#include "model.h"
#include "rng.h"

#define ML_CHECKPOINT_VERSION 1

typedef struct {
    int step;               /* optimizer steps completed */
    uint64_t data_pos;      /* train loader position */
    uint64_t tokens_seen;
    ml_rng rng;
} ml_train_state;

int checkpoint_save(const char *path, const ml_model *m, const ml_train_state *st, ml_err *err);

/* Loads into an initialised model of the same shape; a missing, corrupt or foreign file, or one whose model.*
 * config differs, gives ML_EINPUT naming the file and the difference. */
int checkpoint_load(const char *path, ml_model *m, ml_train_state *st, ml_err *err);

#endif
