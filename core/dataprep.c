/* dataprep.c: documents -> train.bin, val.bin and meta.txt. Splits by whole documents (a hash of the name
 * decides, so adding a file never moves the others), orders documents by a second hash so that sources
 * interleave, and skips all work when meta.txt shows the same inputs. Reading files and fetching are elsewhere. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* POSIX calls (mmap, strdup, clock_gettime, ...) under -std=c11 */
#endif
#include "dataprep.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "shard.h"

#define FNV64_INIT 14695981039346656037ull
#define ORDER_SEED 0x6d6f656c61626f72ull /* any constant other than 0: the order hash differs from the split hash */

static uint64_t fnv64(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* splitmix64's finalizer: FNV's low and high bits are poorly mixed for short names. */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static double unit_hash(const char *name, uint64_t seed) {
    uint64_t h = mix64(fnv64(FNV64_INIT ^ seed, name, strlen(name)));
    return (double)(h >> 11) * 0x1p-53;
}

int dataprep_is_val(const char *name, double val_fraction) { return unit_hash(name, 0) < val_fraction; }

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fingerprint(const ml_tokenizer *t, const ml_docs *docs, double val_fraction, char out[17]) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "moelab dataprep 1\nvocab %d\neot %u\nval_fraction %.17g\n", tok_vocab_size(t),
                     tok_eot(t), val_fraction);
    uint64_t h = fnv64(FNV64_INIT, buf, (size_t)n);
    for (uint32_t id = 0; id <= tok_eot(t); id++) {
        int len = tok_decode_token(t, id, buf, sizeof buf);
        h = fnv64(h, &len, sizeof len);
        if (len > 0) h = fnv64(h, buf, (size_t)len < sizeof buf ? (size_t)len : sizeof buf);
    }
    for (size_t i = 0; i < docs->n; i++) {
        const ml_doc *d = &docs->docs[i];
        h = fnv64(h, d->name, strlen(d->name) + 1);
        h = fnv64(h, &d->len, sizeof d->len);
        h = fnv64(h, d->text, d->len);
    }
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

static int mkdir_p(const char *dir, ml_err *err) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path)
        return ml_errf(err, ML_EINPUT, "%s: path too long", dir);
    for (char *p = path + 1;; p++) {
        if (*p != '/' && *p) continue;
        char c = *p;
        *p = 0;
        if (mkdir(path, 0777) != 0 && errno != EEXIST)
            return ml_errf(err, ML_EINPUT, "%s: cannot create folder: %s", path, strerror(errno));
        *p = c;
        if (!c) break;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return ml_errf(err, ML_EINPUT, "%s: not a folder", dir);
    return 0;
}

int dataprep_meta_read(const char *dir, dp_meta *m, ml_err *err) {
    char path[4096], line[4096];
    snprintf(path, sizeof path, "%s/meta.txt", dir);
    memset(m, 0, sizeof *m);
    FILE *f = fopen(path, "r");
    if (!f) return ml_errf(err, ML_EINPUT, "%s: cannot open: %s", path, strerror(errno));
    enum { VOCAB, EOT, DOCS, BYTES, TRAIN_DOCS, VAL_DOCS, TRAIN_TOKENS, VAL_TOKENS, FINGERPRINT, NKEYS };
    static const char *keys[NKEYS] = {"vocab_size",   "eot",        "documents",  "bytes",      "train_docs",
                                      "val_docs",     "train_tokens", "val_tokens", "fingerprint"};
    int seen[NKEYS] = {0};
    while (fgets(line, sizeof line, f)) {
        char key[64], value[128];
        if (line[0] == '#' || sscanf(line, "%63s = %127s", key, value) != 2) continue;
        for (int k = 0; k < NKEYS; k++) {
            if (strcmp(key, keys[k]) != 0) continue;
            seen[k] = 1;
            unsigned long long v = strtoull(value, NULL, 10);
            switch (k) {
            case VOCAB: m->vocab_size = (int)v; break;
            case EOT: m->eot = (uint32_t)v; break;
            case DOCS: m->documents = (size_t)v; break;
            case BYTES: m->bytes = (size_t)v; break;
            case TRAIN_DOCS: m->train_docs = (size_t)v; break;
            case VAL_DOCS: m->val_docs = (size_t)v; break;
            case TRAIN_TOKENS: m->train_tokens = (size_t)v; break;
            case VAL_TOKENS: m->val_tokens = (size_t)v; break;
            case FINGERPRINT: snprintf(m->fingerprint, sizeof m->fingerprint, "%.16s", value); break;
            }
        }
    }
    fclose(f);
    for (int k = 0; k < NKEYS; k++)
        if (!seen[k]) return ml_errf(err, ML_EINPUT, "%s: missing key '%s'", path, keys[k]);
    return 0;
}

/* True when out_dir already holds complete shards for this fingerprint. */
static int up_to_date(const char *dir, const char *fp, dp_meta *m) {
    if (dataprep_meta_read(dir, m, NULL) != 0 || strcmp(m->fingerprint, fp) != 0) return 0;
    const char *names[2] = {"train.bin", "val.bin"};
    size_t want[2] = {m->train_tokens, m->val_tokens};
    for (int k = 0; k < 2; k++) {
        char path[4096];
        ml_shard s;
        snprintf(path, sizeof path, "%s/%s", dir, names[k]);
        if (shard_open(&s, path, NULL) != 0) return 0;
        size_t n = s.ntokens;
        shard_close(&s);
        if (n != want[k]) return 0;
    }
    return 1;
}

typedef struct {
    size_t index;
    double order;
} doc_order;

static int cmp_order(const void *a, const void *b) {
    const doc_order *x = a, *y = b;
    if (x->order != y->order) return x->order < y->order ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static int write_meta(const char *dir, const dp_config *cfg, const dp_meta *m, const ml_docs *docs,
                      const unsigned char *is_val, ml_err *err) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/meta.txt", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return ml_errf(err, ML_EINPUT, "%s: cannot create: %s", tmp, strerror(errno));
    fprintf(f, "# moelab token shards: train.bin and val.bin are llm.c shards (int32 header[256], then tokens).\n"
               "# Each document is preceded by the eot token. Written by `moelab data`; see data/README.md.\n");
    fprintf(f, "meta_version = 1\n");
    fprintf(f, "fingerprint = %s\n", m->fingerprint);
    fprintf(f, "tokenizer = %s\n", cfg->tokenizer_path ? cfg->tokenizer_path : "?");
    fprintf(f, "vocab_size = %d\n", m->vocab_size);
    fprintf(f, "eot = %u\n", m->eot);
    fprintf(f, "val_fraction = %g\n", cfg->val_fraction);
    fprintf(f, "documents = %zu\n", m->documents);
    fprintf(f, "bytes = %zu\n", m->bytes);
    fprintf(f, "train_docs = %zu\n", m->train_docs);
    fprintf(f, "train_tokens = %zu\n", m->train_tokens);
    fprintf(f, "val_docs = %zu\n", m->val_docs);
    fprintf(f, "val_tokens = %zu\n", m->val_tokens);
    for (const char *s = cfg->sources; s && *s;) {
        const char *nl = strchr(s, '\n');
        int len = nl ? (int)(nl - s) : (int)strlen(s);
        if (len) fprintf(f, "source = %.*s\n", len, s);
        s += len + (nl != NULL);
    }
    for (size_t i = 0; i < docs->n; i++)
        if (is_val[i]) fprintf(f, "val_doc = %s\n", docs->docs[i].name);
    int bad = ferror(f);
    if (fclose(f) != 0) bad = 1;
    if (bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return ml_errf(err, ML_ERUN, "%s: cannot write", path);
    }
    return 0;
}

int dataprep_build(const ml_tokenizer *t, const ml_docs *docs, const dp_config *cfg, dp_result *res, ml_err *err) {
    memset(res, 0, sizeof *res);
    dp_meta *m = &res->meta;
    if (!(cfg->val_fraction >= 0 && cfg->val_fraction < 1))
        return ml_errf(err, ML_EINPUT, "val fraction %g must be in [0, 1)", cfg->val_fraction);
    if (docs->n == 0) return ml_errf(err, ML_EINPUT, "no documents to tokenize");
    char fp[17];
    fingerprint(t, docs, cfg->val_fraction, fp);
    if (up_to_date(cfg->out_dir, fp, m)) {
        res->up_to_date = 1;
        return 0;
    }
    memset(m, 0, sizeof *m);
    memcpy(m->fingerprint, fp, sizeof fp);
    m->vocab_size = tok_vocab_size(t);
    m->eot = tok_eot(t);
    m->documents = docs->n;
    m->bytes = docs->bytes;

    unsigned char *is_val = calloc(docs->n, 1);
    doc_order *order = malloc(docs->n * sizeof *order);
    uint32_t *buf[2] = {NULL, NULL}; /* 0: train, 1: val */
    size_t n[2] = {0, 0}, cap[2] = {0, 0};
    int rc = 0;
    if (!is_val || !order) {
        rc = ml_errf(err, ML_ERUN, "out of memory");
        goto done;
    }
    size_t lowest = 0, highest = 0, nval = 0;
    for (size_t i = 0; i < docs->n; i++) {
        double u = unit_hash(docs->docs[i].name, 0);
        is_val[i] = u < cfg->val_fraction;
        nval += is_val[i];
        if (u < unit_hash(docs->docs[lowest].name, 0)) lowest = i;
        if (u > unit_hash(docs->docs[highest].name, 0)) highest = i;
        order[i] = (doc_order){i, unit_hash(docs->docs[i].name, ORDER_SEED)};
    }
    /* A tiny corpus would otherwise leave one side empty. */
    if (cfg->val_fraction > 0 && docs->n >= 2) {
        if (nval == 0) is_val[lowest] = 1;
        if (nval == docs->n) is_val[highest] = 0;
    }
    qsort(order, docs->n, sizeof *order, cmp_order);

    double t0 = now_seconds();
    uint32_t eot = tok_eot(t);
    for (size_t k = 0; k < docs->n && !rc; k++) {
        size_t i = order[k].index;
        int side = is_val[i];
        const ml_doc *d = &docs->docs[i];
        if (n[side] == cap[side]) {
            size_t c = cap[side] ? 2 * cap[side] : 1 << 16;
            uint32_t *bigger = realloc(buf[side], c * sizeof *bigger);
            if (!bigger) {
                rc = ml_errf(err, ML_ERUN, "out of memory");
                break;
            }
            buf[side] = bigger;
            cap[side] = c;
        }
        buf[side][n[side]++] = eot; /* llm.c fineweb.py: the delimiter comes before each document */
        if ((rc = tok_encode(t, d->text, d->len, &buf[side], &n[side], &cap[side], err))) {
            ml_err_prefix(err, "%s", d->name);
            break;
        }
        if (side) m->val_docs++;
        else m->train_docs++;
    }
    res->encode_seconds = now_seconds() - t0;
    if (rc) goto done;
    m->train_tokens = n[0];
    m->val_tokens = n[1];

    if ((rc = mkdir_p(cfg->out_dir, err))) goto done;
    char path[4096];
    /* meta.txt goes first and comes back last: shards without it are an unfinished run, never a finished one. */
    snprintf(path, sizeof path, "%s/meta.txt", cfg->out_dir);
    if (unlink(path) != 0 && errno != ENOENT) {
        rc = ml_errf(err, ML_EINPUT, "%s: cannot remove the old meta.txt: %s", path, strerror(errno));
        goto done;
    }
    snprintf(path, sizeof path, "%s/train.bin", cfg->out_dir);
    if ((rc = shard_write(path, buf[0], n[0], err))) goto done;
    snprintf(path, sizeof path, "%s/val.bin", cfg->out_dir);
    if ((rc = shard_write(path, buf[1], n[1], err))) goto done;
    rc = write_meta(cfg->out_dir, cfg, m, docs, is_val, err);
done:
    free(is_val);
    free(order);
    free(buf[0]);
    free(buf[1]);
    return rc;
}
