/* dataprep.h: turns documents into llm.c token shards. Each document is encoded and preceded by
 * <|endoftext|> (as llm.c's fineweb.py does); whole documents are held out for validation by a hash of
 * their name; train.bin and val.bin are written first and meta.txt last, so meta.txt marks a complete set. */
#ifndef MOELAB_DATAPREP_H
#define MOELAB_DATAPREP_H

#include <stddef.h>
#include <stdint.h>

#include "corpus.h"
#include "err.h"
#include "tokenizer.h"

typedef struct {
    const char *out_dir;        /* created if missing */
    double val_fraction;        /* of documents, in [0, 1); > 0 puts at least one document on each side */
    const char *tokenizer_path; /* recorded in meta.txt */
    const char *sources;        /* recorded in meta.txt, one "source = " line per line of text; may be NULL */
} dp_config;

typedef struct {
    int vocab_size;
    uint32_t eot;
    size_t documents, bytes;
    size_t train_docs, val_docs, train_tokens, val_tokens;
    char fingerprint[17]; /* hex of a hash over the documents, the tokenizer and the split settings */
} dp_meta;

typedef struct {
    dp_meta meta;
    double encode_seconds;
    int up_to_date; /* 1: out_dir already held shards for these exact inputs, and nothing was written */
} dp_result;

/* Writes out_dir/train.bin, val.bin (llm.c shards) and meta.txt for docs encoded with t, unless meta.txt
 * there already has the same fingerprint and both shards open with the recorded token counts. */
int dataprep_build(const ml_tokenizer *t, const ml_docs *docs, const dp_config *cfg, dp_result *res, ml_err *err);

/* Reads dir/meta.txt. A missing file or a missing key is ML_EINPUT naming the file (and key). */
int dataprep_meta_read(const char *dir, dp_meta *m, ml_err *err);

/* 1 when the document called name goes to validation for this fraction (before the at-least-one rule). */
int dataprep_is_val(const char *name, double val_fraction);

#endif
