/* test_shard.c: llm.c shard round trips (uint16 version 1, uint32 version 2, empty) and the error for each
 * bad input: missing file, truncated header, wrong magic, unknown version, truncated body. Every error must
 * be ML_EINPUT with a message naming the path and the reason. Works in a fresh temporary folder. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* POSIX calls (mmap, strdup, clock_gettime, ...) under -std=c11 */
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shard.h"

#include "check.h"

static char dir[4096];

static const char *path_in(const char *name) {
    static char buf[8][4200];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, 4200, "%s/%s", dir, name);
    return p;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) {
        printf("FAIL: cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

static void round_trip(const char *name, const uint32_t *tokens, size_t n, int want_version) {
    const char *path = path_in(name);
    ml_err err = {0};
    int rc = shard_write(path, tokens, n, &err);
    CHECK(rc == 0, "%s: shard_write failed: %s", name, err.msg);
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0, "%s: the temporary file was left behind", tmp);

    /* The bytes must be llm.c's: header[0] magic, header[1] version, header[2] count, then the tokens. */
    FILE *f = fopen(path, "rb");
    int32_t header[256];
    CHECK(f && fread(header, sizeof header, 1, f) == 1, "%s: cannot read the header back", name);
    if (f) fclose(f);
    CHECK(header[0] == (want_version == 1 ? 20240520 : 20240801), "%s: magic %d", name, header[0]);
    CHECK(header[1] == want_version && header[2] == (int32_t)n, "%s: version %d count %d", name, header[1],
          header[2]);
    int zeros = 1;
    for (int i = 3; i < 256; i++) zeros &= header[i] == 0;
    CHECK(zeros, "%s: header[3..255] should be zero", name);

    ml_shard s;
    rc = shard_open(&s, path, &err);
    CHECK(rc == 0, "%s: shard_open failed: %s", name, err.msg);
    if (rc) return;
    CHECK(s.version == want_version, "%s: version %d, want %d", name, s.version, want_version);
    CHECK(s.ntokens == n, "%s: %zu tokens, want %zu", name, s.ntokens, n);
    size_t bad = 0;
    for (size_t i = 0; i < n && i < s.ntokens; i++) bad += shard_token(&s, i) != tokens[i];
    CHECK(bad == 0, "%s: %zu tokens differ after the round trip", name, bad);
    shard_close(&s);
}

/* Opening path must fail with ML_EINPUT and a message holding the path and reason. */
static void expect_error(const char *what, const char *path, const char *reason) {
    ml_shard s;
    ml_err err = {0};
    int rc = shard_open(&s, path, &err);
    CHECK(rc == ML_EINPUT, "%s: shard_open returned %d, want ML_EINPUT (%d)", what, rc, ML_EINPUT);
    CHECK(strstr(err.msg, path) != NULL, "%s: message does not name the path: \"%s\"", what, err.msg);
    CHECK(strstr(err.msg, reason) != NULL, "%s: message does not say \"%s\": \"%s\"", what, reason, err.msg);
    if (rc == 0) shard_close(&s);
    printf("ok: %s -> %s\n", what, err.msg);
}

static void write_header(const char *path, int32_t magic, int32_t version, int32_t count, size_t body_bytes) {
    size_t n = 1024 + body_bytes;
    unsigned char *buf = calloc(1, n);
    int32_t h[3] = {magic, version, count};
    memcpy(buf, h, sizeof h);
    write_bytes(path, buf, n);
    free(buf);
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/moelab_test_shard_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir)) {
        printf("FAIL: cannot create a temporary folder %s\ntest_shard: FAIL\n", dir);
        return 1;
    }

    enum { N = 100000 };
    uint32_t *tokens = malloc(N * sizeof *tokens);
    for (size_t i = 0; i < N; i++) tokens[i] = (uint32_t)((i * 2654435761u) % 65536);
    tokens[7] = 65535;
    round_trip("v1.bin", tokens, N, 1);
    tokens[9] = 65536;
    tokens[11] = 200000;
    round_trip("v2.bin", tokens, N, 2);
    round_trip("empty.bin", tokens, 0, 1);
    round_trip("overwrite.bin", tokens, 10, 2);
    round_trip("overwrite.bin", tokens, 5, 1);

    expect_error("missing file", path_in("no_such.bin"), "cannot open");
    write_bytes(path_in("short.bin"), "abc", 3);
    expect_error("truncated header", path_in("short.bin"), "shorter than the 1024-byte");
    write_header(path_in("magic.bin"), 1234, 1, 0, 0);
    expect_error("wrong magic", path_in("magic.bin"), "wrong magic 1234 (expected 20240520 or 20240801)");
    write_header(path_in("version.bin"), 20240520, 3, 0, 0);
    expect_error("unknown version", path_in("version.bin"), "unknown shard version 3");
    write_header(path_in("body.bin"), 20240520, 1, 10, 19);
    expect_error("truncated body", path_in("body.bin"), "size mismatch");
    write_header(path_in("long.bin"), 20240801, 2, 10, 44);
    expect_error("body longer than the header says", path_in("long.bin"), "size mismatch");
    expect_error("a folder", dir, "not a regular file");

    ml_err err = {0};
    const char *nowhere = "/nonexistent-folder/moelab/train.bin";
    int rc = shard_write(nowhere, tokens, 3, &err);
    CHECK(rc == ML_EINPUT && strstr(err.msg, "/nonexistent-folder/moelab/train.bin"),
          "writing into a missing folder: rc %d, \"%s\"", rc, err.msg);

    free(tokens);
    const char *names[] = {"v1.bin", "v2.bin", "empty.bin", "overwrite.bin", "short.bin", "magic.bin",
                           "version.bin", "body.bin", "long.bin"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) unlink(path_in(names[i]));
    rmdir(dir);
    printf("shard: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
