/* shard.c: reads and writes llm.c token shards (256 x int32 header, then uint16 or uint32 tokens).
 * Reading maps the file read-only and validates magic, version and size before handing out tokens;
 * writing goes to "<path>.tmp" and renames, so a reader never sees a half-written shard. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* POSIX calls (mmap, strdup, clock_gettime, ...) under -std=c11 */
#endif
#include "shard.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
    HEADER_INTS = 256,
    HEADER_BYTES = HEADER_INTS * 4,
    MAGIC_V1 = 20240520, /* llm.c dev/data/data_common.py: uint16 tokens */
    MAGIC_V2 = 20240801, /* uint32 tokens */
};

int shard_open(ml_shard *s, const char *path, ml_err *err) {
    memset(s, 0, sizeof *s);
    snprintf(s->path, sizeof s->path, "%s", path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return ml_errf(err, ML_EINPUT, "%s: cannot open token shard: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ml_errf(err, ML_EINPUT, "%s: cannot stat token shard: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ml_errf(err, ML_EINPUT, "%s: not a regular file: not an llm.c token shard", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < HEADER_BYTES) {
        close(fd);
        return ml_errf(err, ML_EINPUT, "%s: file is %zu bytes, shorter than the %d-byte llm.c shard header", path,
                       size, HEADER_BYTES);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) return ml_errf(err, ML_EINPUT, "%s: cannot map token shard: %s", path, strerror(map_errno));

    const int32_t *h = map;
    int magic = h[0], version = h[1];
    long long count = h[2];
    int rc = 0;
    if (magic != MAGIC_V1 && magic != MAGIC_V2) {
        rc = ml_errf(err, ML_EINPUT, "%s: wrong magic %d (expected %d or %d): not an llm.c token shard", path, magic,
                     MAGIC_V1, MAGIC_V2);
    } else if ((magic == MAGIC_V1 && version != 1) || (magic == MAGIC_V2 && version != 2)) {
        rc = ml_errf(err, ML_EINPUT, "%s: unknown shard version %d for magic %d (expected version %d)", path, version,
                     magic, magic == MAGIC_V1 ? 1 : 2);
    } else if (count < 0) {
        rc = ml_errf(err, ML_EINPUT, "%s: negative token count %lld in the shard header", path, count);
    } else {
        size_t width = version == 1 ? 2 : 4;
        size_t want = HEADER_BYTES + (size_t)count * width;
        if (size != want)
            rc = ml_errf(err, ML_EINPUT,
                         "%s: size mismatch: header says %lld tokens of %zu bytes (%zu bytes in all) but the file is "
                         "%zu bytes: truncated or corrupt shard",
                         path, count, width, want, size);
    }
    if (rc) {
        munmap(map, size);
        return rc;
    }
    s->version = version;
    s->ntokens = (size_t)count;
    s->tokens = (const char *)map + HEADER_BYTES;
    s->map = map;
    s->map_len = size;
    return 0;
}

void shard_close(ml_shard *s) {
    if (s->map) munmap(s->map, s->map_len);
    s->map = NULL;
    s->tokens = NULL;
    s->map_len = 0;
    s->ntokens = 0;
}

/* Writes the whole buffer or fails; short writes (disk full) are errors, not retries forever. */
static int write_all(FILE *f, const void *buf, size_t n) { return fwrite(buf, 1, n, f) == n ? 0 : -1; }

int shard_write(const char *path, const uint32_t *tokens, size_t n, ml_err *err) {
    if (n > INT32_MAX)
        return ml_errf(err, ML_EINPUT, "%s: %zu tokens do not fit the llm.c header's int32 count", path, n);
    int version = 1;
    for (size_t i = 0; i < n; i++)
        if (tokens[i] > UINT16_MAX) {
            version = 2;
            break;
        }
    int32_t header[HEADER_INTS] = {0};
    header[0] = version == 1 ? MAGIC_V1 : MAGIC_V2;
    header[1] = version;
    header[2] = (int32_t)n;

    char tmp[1100];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return ml_errf(err, ML_EINPUT, "%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return ml_errf(err, ML_EINPUT, "%s: cannot create: %s", tmp, strerror(errno));
    int bad = write_all(f, header, sizeof header);
    if (version == 2) {
        if (!bad) bad = write_all(f, tokens, n * sizeof *tokens);
    } else {
        uint16_t chunk[4096];
        for (size_t i = 0; i < n && !bad; i += 4096) {
            size_t m = n - i < 4096 ? n - i : 4096;
            for (size_t j = 0; j < m; j++) chunk[j] = (uint16_t)tokens[i + j];
            bad = write_all(f, chunk, m * sizeof *chunk);
        }
    }
    int e = errno;
    if (fclose(f) != 0 && !bad) {
        bad = 1;
        e = errno;
    }
    if (bad) {
        unlink(tmp);
        return ml_errf(err, ML_ERUN, "%s: write failed: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        e = errno;
        unlink(tmp);
        return ml_errf(err, ML_ERUN, "%s: cannot rename %s into place: %s", path, tmp, strerror(e));
    }
    return 0;
}
