/* shard.h: llm.c-compatible token shards. A shard is a 256 x int32 header (magic, version, token count,
 * zeros) followed by the tokens: version 1 = uint16 tokens (magic 20240520), version 2 = uint32 tokens
 * (magic 20240801), exactly as llm.c writes them, so existing llm.c shards load unchanged.
 * Reading maps the file; it does not copy tokens. */
#ifndef MOELAB_SHARD_H
#define MOELAB_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct {
    char path[1024];
    int version;          /* 1: uint16 tokens, 2: uint32 tokens */
    size_t ntokens;
    const void *tokens;   /* points into the mapping */
    void *map;
    size_t map_len;
} ml_shard;

/* Opens and validates a shard (magic, version, size == header + ntokens * width). A missing, truncated or
 * wrong-magic file gives ML_EINPUT with a message naming the path and what is wrong. */
int shard_open(ml_shard *s, const char *path, ml_err *err);

/* Token i of an open shard (i < s->ntokens). */
static inline uint32_t shard_token(const ml_shard *s, size_t i) {
    return s->version == 1 ? ((const uint16_t *)s->tokens)[i] : ((const uint32_t *)s->tokens)[i];
}

void shard_close(ml_shard *s);

/* Writes tokens to path atomically (temp file + rename): version 1 when every token < 65536, else 2. */
int shard_write(const char *path, const uint32_t *tokens, size_t n, ml_err *err);

#endif
