/* tokenizer.c: GPT-2 byte-level BPE, merge for merge the same as tiktoken's r50k_base encoder.
 * Text is cut into pieces by GPT-2's pre-tokenization regex (pcre2, JIT), then each piece is merged by
 * lowest rank first (leftmost on ties), as in tiktoken's _byte_pair_merge. Special tokens are not parsed. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"

#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_RANK UINT32_MAX

/* tiktoken (Rust regex) reads \s as Unicode White_Space; PCRE2's \s with UCP also takes U+180E, so the class
 * is spelled out. The alternatives are GPT-2's encoder.py pattern. */
#define WS "\\t\\n\\x0B\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
static const char GPT2_PATTERN[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|[" WS
                                   "]+(?![^" WS "])|[" WS "]+";

static const char EOT_TEXT[] = "<|endoftext|>";

/* Pieces up to this many bytes merge by rescanning an array (tiktoken's way, fastest when short); longer
 * ones (runs of spaces, dashes, digits) use a heap so a long piece costs O(n log n), not O(n^2). */
#ifndef TOK_HEAP_MIN
#define TOK_HEAP_MIN 64
#endif

typedef struct {
    uint32_t hash;
    uint32_t id_plus1; /* 0: empty slot */
} slot;

struct ml_tokenizer {
    int vocab_size;
    uint32_t eot;         /* == number of ordinary tokens kept */
    uint32_t *offset;     /* id -> start of its bytes in `bytes` */
    uint8_t *length;      /* id -> byte length */
    unsigned char *bytes;
    int max_len;          /* longest kept token, in bytes */
    uint32_t byte_id[256];
    uint32_t *pair_id;    /* 65536 entries: id of each two-byte token, or NO_RANK */
    slot *table;
    uint32_t mask;
    pcre2_code *re;
    int jit;
};

/* FNV-1a: tokens are short, so a byte loop is as fast as anything fancier. */
static inline uint32_t hash_bytes(const unsigned char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h ^ (h >> 16);
}

/* The id of the token whose bytes are p[0..n), or NO_RANK when no kept token has them. */
static inline uint32_t lookup(const ml_tokenizer *t, const unsigned char *p, size_t n) {
    if (n == 1) return t->byte_id[p[0]];
    if (n == 2) return t->pair_id[(unsigned)p[0] << 8 | p[1]];
    if ((int)n > t->max_len) return NO_RANK;
    uint32_t h = hash_bytes(p, n);
    for (uint32_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const slot *s = &t->table[i];
        if (!s->id_plus1) return NO_RANK;
        uint32_t id = s->id_plus1 - 1;
        if (s->hash == h && t->length[id] == n && memcmp(t->bytes + t->offset[id], p, n) == 0) return id;
    }
}

static int b64_value(int c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Decodes standard base64 (with '=' padding) from s[0..n) into out; returns the byte count or -1. */
static int b64_decode(const char *s, size_t n, unsigned char *out, size_t cap) {
    if (n == 0 || n % 4) return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            if (s[i + k] == '=' && i + 4 == n && k >= 2) {
                v[k] = 0;
                pad++;
            } else {
                if (pad) return -1;
                v[k] = b64_value((unsigned char)s[i + k]);
                if (v[k] < 0) return -1;
            }
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        unsigned char b[3] = {(unsigned char)(w >> 16), (unsigned char)(w >> 8), (unsigned char)w};
        for (int k = 0; k < 3 - pad; k++) {
            if (o >= cap) return -1;
            out[o++] = b[k];
        }
    }
    return (int)o;
}

typedef struct {
    uint32_t rank;
    uint32_t offset;
    uint32_t length;
    long line;
} rank_entry;

static char *read_file(const char *path, size_t *len, ml_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        ml_errf(err, ML_EINPUT, "%s: cannot open tokenizer ranks: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf) break;
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *bigger = realloc(buf, 2 * cap + 1);
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        free(buf);
        ml_errf(err, ML_EINPUT, "%s: cannot read tokenizer ranks", path);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* Parses "base64 rank" lines into entries and their decoded bytes; ranks are checked later. */
static int parse_ranks(const char *path, const char *text, size_t len, rank_entry **out_entries, size_t *out_n,
                       unsigned char **out_bytes, ml_err *err) {
    size_t cap = 1024, n = 0, bcap = 1 << 16, bn = 0;
    rank_entry *e = malloc(cap * sizeof *e);
    unsigned char *bytes = malloc(bcap);
    int rc = 0;
    long line = 0;
    for (size_t pos = 0; pos < len && !rc;) {
        line++;
        const char *s = text + pos;
        const char *nl = memchr(s, '\n', len - pos);
        size_t ll = nl ? (size_t)(nl - s) : len - pos;
        pos += ll + (nl != NULL);
        if (ll && s[ll - 1] == '\r') ll--;
        if (ll == 0) continue; /* tiktoken's loader skips blank lines too */
        const char *sp = memchr(s, ' ', ll);
        if (!sp) {
            rc = ml_errf(err, ML_EINPUT, "%s:%ld: expected \"base64token rank\"", path, line);
            break;
        }
        char *end;
        errno = 0;
        unsigned long r = strtoul(sp + 1, &end, 10);
        if (end == sp + 1 || end != s + ll || errno || r >= INT32_MAX || sp[1] == '-') {
            rc = ml_errf(err, ML_EINPUT, "%s:%ld: bad rank '%.*s'", path, line, (int)(s + ll - sp - 1), sp + 1);
            break;
        }
        if (n == cap) {
            cap *= 2;
            rank_entry *bigger = realloc(e, cap * sizeof *e);
            if (!bigger) {
                rc = ml_errf(err, ML_ERUN, "out of memory loading %s", path);
                break;
            }
            e = bigger;
        }
        if (bn + 256 > bcap) {
            bcap *= 2;
            unsigned char *bigger = realloc(bytes, bcap);
            if (!bigger) {
                rc = ml_errf(err, ML_ERUN, "out of memory loading %s", path);
                break;
            }
            bytes = bigger;
        }
        int nb = b64_decode(s, (size_t)(sp - s), bytes + bn, 255);
        if (nb <= 0) {
            rc = ml_errf(err, ML_EINPUT, "%s:%ld: bad base64 token '%.*s' (or longer than 255 bytes)", path, line,
                         (int)(sp - s), s);
            break;
        }
        e[n++] = (rank_entry){(uint32_t)r, (uint32_t)bn, (uint32_t)nb, line};
        bn += (size_t)nb;
    }
    if (rc) {
        free(e);
        free(bytes);
        return rc;
    }
    *out_entries = e;
    *out_n = n;
    *out_bytes = bytes;
    return 0;
}

static int compile_pattern(ml_tokenizer *t, ml_err *err) {
    int code;
    PCRE2_SIZE at;
    t->re = pcre2_compile((PCRE2_SPTR)GPT2_PATTERN, PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &code, &at, NULL);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return ml_errf(err, ML_ERUN, "pcre2 cannot compile the GPT-2 pattern at offset %zu: %s", (size_t)at,
                       (char *)msg);
    }
    /* Without JIT (unsupported CPU) pcre2_match gives the same pieces, only slower. */
    t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

int tok_load(ml_tokenizer **out, const char *path, int vocab_size, ml_err *err) {
    *out = NULL;
    size_t len;
    char *text = read_file(path, &len, err);
    if (!text) return err ? err->code : ML_EINPUT;
    rank_entry *e = NULL;
    unsigned char *raw = NULL;
    size_t n = 0;
    int rc = parse_ranks(path, text, len, &e, &n, &raw, err);
    free(text);
    if (rc) return rc;

    ml_tokenizer *t = calloc(1, sizeof *t);
    long *line_of = calloc(n ? n : 1, sizeof *line_of);
    if (!t || !line_of) {
        rc = ml_errf(err, ML_ERUN, "out of memory loading %s", path);
        goto done;
    }
    /* Ranks must be exactly 0..n-1 so that a rank is an id. */
    for (size_t i = 0; i < n; i++) {
        if (e[i].rank >= n) {
            rc = ml_errf(err, ML_EINPUT, "%s:%ld: rank %u but the file has only %zu ranks (ranks must be 0..%zu)",
                         path, e[i].line, e[i].rank, n, n - 1);
            goto done;
        }
        if (line_of[e[i].rank]) {
            rc = ml_errf(err, ML_EINPUT, "%s:%ld: rank %u already given on line %ld", path, e[i].line, e[i].rank,
                         line_of[e[i].rank]);
            goto done;
        }
        line_of[e[i].rank] = e[i].line;
    }
    if (vocab_size == 0) vocab_size = (int)n + 1;
    if (vocab_size < 257 || (size_t)vocab_size > n + 1) {
        rc = ml_errf(err, ML_EINPUT, "%s: vocab size %d out of range: must be in [257, %zu] (or 0 for all)", path,
                     vocab_size, n + 1);
        goto done;
    }
    t->vocab_size = vocab_size;
    t->eot = (uint32_t)vocab_size - 1;
    size_t keep = t->eot, total = 0;
    t->offset = malloc(keep * sizeof *t->offset);
    t->length = malloc(keep);
    t->pair_id = malloc(65536 * sizeof *t->pair_id);
    uint32_t size = 1;
    while (size < 4 * keep) size *= 2;
    t->table = calloc(size, sizeof *t->table);
    t->mask = size - 1;
    for (size_t i = 0; i < n; i++)
        if (e[i].rank < keep) total += e[i].length;
    t->bytes = malloc(total ? total : 1);
    if (!t->offset || !t->length || !t->pair_id || !t->table || !t->bytes) {
        rc = ml_errf(err, ML_ERUN, "out of memory loading %s", path);
        goto done;
    }
    for (int b = 0; b < 256; b++) t->byte_id[b] = NO_RANK;
    for (int p = 0; p < 65536; p++) t->pair_id[p] = NO_RANK;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t id = e[i].rank, L = e[i].length;
        if (id >= keep) continue;
        const unsigned char *b = raw + e[i].offset;
        memcpy(t->bytes + at, b, L);
        t->offset[id] = (uint32_t)at;
        t->length[id] = (uint8_t)L;
        at += L;
        if ((int)L > t->max_len) t->max_len = (int)L;
        if (L == 1 || L == 2) {
            uint32_t *cell = L == 1 ? &t->byte_id[b[0]] : &t->pair_id[(unsigned)b[0] << 8 | b[1]];
            if (*cell != NO_RANK) {
                rc = ml_errf(err, ML_EINPUT, "%s:%ld: token bytes repeat those of rank %u", path, e[i].line, *cell);
                goto done;
            }
            *cell = id;
            continue;
        }
        uint32_t h = hash_bytes(b, L);
        uint32_t s = h & t->mask;
        for (; t->table[s].id_plus1; s = (s + 1) & t->mask) {
            uint32_t other = t->table[s].id_plus1 - 1;
            if (t->length[other] == L && memcmp(t->bytes + t->offset[other], b, L) == 0) {
                rc = ml_errf(err, ML_EINPUT, "%s:%ld: token bytes repeat those of rank %u", path, e[i].line, other);
                goto done;
            }
        }
        t->table[s] = (slot){h, id + 1};
    }
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] == NO_RANK) {
            rc = ml_errf(err, ML_EINPUT, "%s: byte 0x%02x has no rank below %zu, so some text cannot be encoded", path,
                         b, keep);
            goto done;
        }
    rc = compile_pattern(t, err);
done:
    free(e);
    free(raw);
    free(line_of);
    if (rc) {
        tok_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

void tok_free(ml_tokenizer *t) {
    if (!t) return;
    if (t->re) pcre2_code_free(t->re);
    free(t->offset);
    free(t->length);
    free(t->bytes);
    free(t->pair_id);
    free(t->table);
    free(t);
}

int tok_vocab_size(const ml_tokenizer *t) { return t->vocab_size; }

uint32_t tok_eot(const ml_tokenizer *t) { return t->eot; }

int tok_decode_token(const ml_tokenizer *t, uint32_t id, char *buf, size_t cap) {
    const char *src;
    size_t len;
    if (id < t->eot) {
        src = (const char *)t->bytes + t->offset[id];
        len = t->length[id];
    } else if (id == t->eot) {
        src = EOT_TEXT;
        len = sizeof EOT_TEXT - 1;
    } else {
        return -1;
    }
    memcpy(buf, src, len < cap ? len : cap);
    return (int)len;
}

/* tiktoken's _byte_pair_merge: parts[i] starts at start[i]; rank[i] is the rank of parts i and i+1 joined. */
static size_t merge_small(const ml_tokenizer *t, const unsigned char *p, size_t len, uint32_t *out) {
    uint32_t start[TOK_HEAP_MIN + 1], rank[TOK_HEAP_MIN + 1];
    size_t parts = len + 1;
    for (size_t i = 0; i <= len; i++) start[i] = (uint32_t)i;
    for (size_t i = 0; i + 1 < len; i++) rank[i] = t->pair_id[(unsigned)p[i] << 8 | p[i + 1]];
    rank[len - 1] = rank[len] = NO_RANK;
    for (;;) {
        uint32_t best = NO_RANK;
        size_t at = 0;
        for (size_t i = 0; i + 1 < parts; i++)
            if (rank[i] < best) {
                best = rank[i];
                at = i;
            }
        if (best == NO_RANK) break;
        /* Joining at and at+1: the neighbours' pair ranks now span one more part. */
        if (at > 0)
            rank[at - 1] = at + 2 < parts ? lookup(t, p + start[at - 1], start[at + 2] - start[at - 1]) : NO_RANK;
        rank[at] = at + 3 < parts ? lookup(t, p + start[at], start[at + 3] - start[at]) : NO_RANK;
        memmove(start + at + 1, start + at + 2, (parts - at - 2) * sizeof *start);
        memmove(rank + at + 1, rank + at + 2, (parts - at - 2) * sizeof *rank);
        parts--;
    }
    size_t n = 0;
    for (size_t i = 0; i + 1 < parts; i++) out[n++] = lookup(t, p + start[i], start[i + 1] - start[i]);
    return n;
}

typedef struct {
    uint32_t *next, *prev, *rank;
    uint64_t *heap; /* (rank << 32 | position): the minimum is the lowest rank, leftmost on ties */
    size_t heap_n, cap;
} merge_state;

static void heap_push(merge_state *m, uint64_t v) {
    size_t i = m->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (m->heap[parent] <= v) break;
        m->heap[i] = m->heap[parent];
        i = parent;
    }
    m->heap[i] = v;
}

static uint64_t heap_pop(merge_state *m) {
    uint64_t top = m->heap[0], last = m->heap[--m->heap_n];
    size_t i = 0, n = m->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && m->heap[c + 1] < m->heap[c]) c++;
        if (m->heap[c] >= last) break;
        m->heap[i] = m->heap[c];
        i = c;
    }
    if (n) m->heap[i] = last;
    return top;
}

/* Rank of the part starting at i joined with the one after it. */
static uint32_t pair_rank(const ml_tokenizer *t, const merge_state *m, const unsigned char *p, size_t len,
                          uint32_t i) {
    uint32_t j = m->next[i];
    if (j >= len) return NO_RANK;
    uint32_t end = m->next[j];
    return lookup(t, p + i, end - i);
}

/* The same merges as merge_small, in O(n log n): a stale heap entry is one whose rank no longer matches
 * its part's current pair rank (two different pairs never share a rank, since ranks name byte strings). */
static int merge_large(const ml_tokenizer *t, const unsigned char *p, size_t len, uint32_t *out, size_t *nout) {
    merge_state m = {0};
    m.next = malloc(len * sizeof *m.next);
    m.prev = malloc(len * sizeof *m.prev);
    m.rank = malloc(len * sizeof *m.rank);
    m.heap = malloc(3 * len * sizeof *m.heap);
    if (!m.next || !m.prev || !m.rank || !m.heap) {
        free(m.next), free(m.prev), free(m.rank), free(m.heap);
        return -1;
    }
    for (uint32_t i = 0; i < len; i++) {
        m.next[i] = i + 1;
        m.prev[i] = i ? i - 1 : UINT32_MAX;
    }
    for (uint32_t i = 0; i < len; i++) {
        m.rank[i] = i + 1 < len ? t->pair_id[(unsigned)p[i] << 8 | p[i + 1]] : NO_RANK;
        if (m.rank[i] != NO_RANK) heap_push(&m, (uint64_t)m.rank[i] << 32 | i);
    }
    while (m.heap_n) {
        uint64_t top = heap_pop(&m);
        uint32_t i = (uint32_t)top, r = (uint32_t)(top >> 32);
        if (m.rank[i] != r) continue;
        uint32_t j = m.next[i];
        m.rank[j] = NO_RANK; /* j is gone: entries for it are stale */
        m.next[i] = m.next[j];
        if (m.next[j] < len) m.prev[m.next[j]] = i;
        m.rank[i] = pair_rank(t, &m, p, len, i);
        if (m.rank[i] != NO_RANK) heap_push(&m, (uint64_t)m.rank[i] << 32 | i);
        uint32_t h = m.prev[i];
        if (h != UINT32_MAX) {
            m.rank[h] = pair_rank(t, &m, p, len, h);
            if (m.rank[h] != NO_RANK) heap_push(&m, (uint64_t)m.rank[h] << 32 | h);
        }
    }
    size_t n = 0;
    for (uint32_t i = 0; i < len; i = m.next[i]) out[n++] = lookup(t, p + i, m.next[i] - i);
    *nout = n;
    free(m.next), free(m.prev), free(m.rank), free(m.heap);
    return 0;
}

/* Appends the tokens of one piece; out has room for len ids. Returns the count, or -1 out of memory. */
static long encode_piece(const ml_tokenizer *t, const unsigned char *p, size_t len, uint32_t *out) {
    uint32_t whole = lookup(t, p, len);
    if (whole != NO_RANK) {
        out[0] = whole;
        return 1;
    }
    if (len <= TOK_HEAP_MIN) return (long)merge_small(t, p, len, out);
    size_t n;
    if (merge_large(t, p, len, out, &n)) return -1;
    return (long)n;
}

static int reserve(uint32_t **ids, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    uint32_t *bigger = realloc(*ids, c * sizeof *bigger);
    if (!bigger) return -1;
    *ids = bigger;
    *cap = c;
    return 0;
}

int tok_encode(const ml_tokenizer *t, const char *text, size_t len, uint32_t **ids, size_t *n, size_t *cap,
               ml_err *err) {
    const unsigned char *s = (const unsigned char *)text;
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(t->re, NULL);
    if (!md) return ml_errf(err, ML_ERUN, "out of memory in tok_encode");
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    int rc = 0;
    size_t pos = 0;
    while (pos < len) {
        int m = t->jit ? pcre2_jit_match(t->re, s, len, pos, 0, md, NULL)
                       : pcre2_match(t->re, s, len, pos, 0, md, NULL);
        size_t ms, me;
        if (m == PCRE2_ERROR_NOMATCH) {
            ms = me = len;
        } else if (m < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(m, msg, sizeof msg);
            rc = ml_errf(err, ML_ERUN, "pre-tokenizing at byte %zu: pcre2: %s", pos, (char *)msg);
            break;
        } else {
            ms = ov[0];
            me = ov[1];
        }
        /* Bytes the pattern skipped are invalid UTF-8 (PCRE2_MATCH_INVALID_UTF never matches them): they
         * become a piece of their own, so encoding still round-trips. */
        const unsigned char *piece[2] = {s + pos, s + ms};
        size_t plen[2] = {ms - pos, me - ms};
        for (int k = 0; k < 2 && !rc; k++) {
            if (!plen[k]) continue;
            if (reserve(ids, cap, *n + plen[k])) {
                rc = ml_errf(err, ML_ERUN, "out of memory in tok_encode");
                break;
            }
            long got = encode_piece(t, piece[k], plen[k], *ids + *n);
            if (got < 0) {
                rc = ml_errf(err, ML_ERUN, "out of memory in tok_encode");
                break;
            }
            *n += (size_t)got;
        }
        if (rc) break;
        pos = me;
    }
    pcre2_match_data_free(md);
    return rc;
}
