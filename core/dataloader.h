/* dataloader.h: batches of (inputs, targets) from one token shard. loader_next reads B*T+1 consecutive tokens
 * from pos (wrapping to the start when they would run past the end) and moves pos by B*T. pos is all the
 * state there is, so a checkpoint that stores it resumes on the same batches. */
#ifndef MOELAB_DATALOADER_H
#define MOELAB_DATALOADER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "shard.h"

typedef struct {
    ml_shard shard;
    int B, T;
    size_t pos;
    int32_t *inputs, *targets; /* (B*T) each, host memory */
} ml_loader;

/* Opens the shard at path; fails (naming the file) if it is not a valid shard, holds fewer than B*T+1
 * tokens, or holds a token >= vocab. */
int loader_open(ml_loader *d, const char *path, int B, int T, int vocab, ml_err *err);
void loader_next(ml_loader *d);
void loader_close(ml_loader *d);

#endif
