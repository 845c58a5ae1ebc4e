/* dataloader.c: sequential batches over an llm.c token shard. */
#include "dataloader.h"

#include <stdlib.h>
#include <string.h>

int loader_open(ml_loader *d, const char *path, int B, int T, int vocab, ml_err *err) {
    memset(d, 0, sizeof *d);
    int rc = shard_open(&d->shard, path, err);
    if (rc) return rc;
    if (d->shard.ntokens < (size_t)B * T + 1) {
        shard_close(&d->shard);
        return ml_errf(err, ML_EINPUT, "%s: %zu tokens, fewer than one batch needs (train.batch * model.seq_len + 1 = %zu)",
                       path, d->shard.ntokens, (size_t)B * T + 1);
    }
    /* a full scan is cheap next to training and turns a vocabulary mismatch into a clear error */
    for (size_t i = 0; i < d->shard.ntokens; i++)
        if (shard_token(&d->shard, i) >= (uint32_t)vocab) {
            uint32_t t = shard_token(&d->shard, i);
            shard_close(&d->shard);
            return ml_errf(err, ML_EINPUT, "%s: token %u at position %zu is outside model.vocab=%d", path, t, i, vocab);
        }
    d->B = B, d->T = T;
    d->inputs = malloc(sizeof(int32_t) * B * T);
    d->targets = malloc(sizeof(int32_t) * B * T);
    return ML_OK;
}

void loader_next(ml_loader *d) {
    const size_t n = (size_t)d->B * d->T;
    if (d->pos + n + 1 > d->shard.ntokens) d->pos = 0;
    for (size_t i = 0; i < n; i++) {
        d->inputs[i] = (int32_t)shard_token(&d->shard, d->pos + i);
        d->targets[i] = (int32_t)shard_token(&d->shard, d->pos + i + 1);
    }
    d->pos += n;
}

void loader_close(ml_loader *d) {
    shard_close(&d->shard);
    free(d->inputs);
    free(d->targets);
    memset(d, 0, sizeof *d);
}
