/* tokenizer.h: byte-level BPE (GPT-2 / tiktoken r50k_base) in C. Loads a .tiktoken rank file
 * (base64 token, rank per line), pre-tokenizes with GPT-2's regex (pcre2, UTF-8, JIT) and merges by rank.
 * Keeping only the lowest-ranked tokens gives a smaller vocabulary for CPU-sized models. */
#ifndef MOELAB_TOKENIZER_H
#define MOELAB_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct ml_tokenizer ml_tokenizer;

/* Loads ranks from path. vocab_size 0 keeps every rank (r50k_base: 50256 ranks + <|endoftext|> = 50257);
 * otherwise keeps ranks < vocab_size - 1 and uses vocab_size - 1 as <|endoftext|>. vocab_size must be
 * in [257, ranks + 1]. Errors name the file and line. */
int tok_load(ml_tokenizer **out, const char *path, int vocab_size, ml_err *err);
void tok_free(ml_tokenizer *t);

int tok_vocab_size(const ml_tokenizer *t);
uint32_t tok_eot(const ml_tokenizer *t); /* the <|endoftext|> id, used as the document separator */

/* Appends the encoding of text[0..len) to *ids (realloc'd; *n and *cap track it). The text is treated as
 * ordinary text: "<|endoftext|>" inside it is encoded as characters, not as the special token. Bytes that
 * are not valid UTF-8 are encoded as bytes, so any input round-trips. Safe to call from several threads. */
int tok_encode(const ml_tokenizer *t, const char *text, size_t len, uint32_t **ids, size_t *n, size_t *cap,
               ml_err *err);

/* Writes the bytes of token id to buf (up to cap); returns the byte count, or -1 for an unknown id.
 * Like snprintf, a count above cap means only cap bytes were written; no token is longer than 255 bytes. */
int tok_decode_token(const ml_tokenizer *t, uint32_t id, char *buf, size_t cap);

#endif
