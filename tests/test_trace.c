/* test_trace.c: the HDF5 trace written with irregular flushes and read back exactly by every reader; resume
 * after a crash (rows past the checkpoint dropped, none duplicated or missing); a writer killed with -9
 * leaves the file as of its last flush, readable while it runs; a reader holding the file delays a flush;
 * every bad input (text, empty, missing, foreign HDF5, newer schema, other run or shape, truncated, a
 * damaged chunk) is ML_EINPUT naming the path, with nothing printed by HDF5. Works in a fresh temporary
 * folder.
 *
 *   test_trace [--keep TRACE]   also writes the round-trip trace to TRACE (kept) and TRACE.expected.json
 *                               (shape, attributes, layer 1's per-step MaxVio) for tests/test_trace_h5py.py */
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "metrics.h"
#include "trace.h"

#include "check.h"

enum { L = 3, E = 5, EVAL_EVERY = 7 };
static const char *RUN_ID = "test-run-7";
static const char *CONFIG = "model:\n  layers: 3\n  experts: 5\nbalance:\n  policy: aux_loss # \"quoted\"\n";

static char dir[4096];

static const char *path_in(const char *name) {
    static char buf[8][4200];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, 4200, "%s/%s", dir, name);
    return p;
}

/* ---- the values: each a formula of (step, layer, expert), so any misplaced or missing row shows. Floats are
 * an integer over a power of two, exact however the compiler contracts them (-march=native brings FMA). */

static int32_t load_of(int64_t s, int l, int e) { return (int32_t)((s * 7 + l * 13 + e * 3 + (s * e) % 11) % 97 + 1); }
static int32_t selected_of(int64_t s, int l, int e) { return load_of(s, l, e) + (int32_t)((s + e) % 3); }
static float gate_of(int64_t s, int l, int e) { return (float)((s * 7 + l * 31 + e * 13) % 4096) / 4096.0f; }
static float bias_of(int64_t s, int l, int e) { return (float)((s % 17) * 5 + e * 3 + l - 40) / 64.0f; }
static float policy_of(int64_t s, int l) { return (float)((s * 3 + l) % 10007) / 8.0f; }
static int32_t topk_of(int64_t s, int l) { return 1 + (int32_t)((s + l) % 2); }
static int32_t dropped_of(int64_t s, int l) { return (int32_t)((s * (l + 1)) % 5); }
static float loss_of(int64_t s) { return (float)(10000 - s % 9000) / 1024.0f; }
static float lr_of(int64_t s) { return (float)(s % 100) / 131072.0f; }
static float norm_of(int64_t s) { return 1.0f + (float)(s % 7); }
static int64_t tokens_of(int64_t s) { return (s + 1) * 4096 + ((int64_t)1 << 33); } /* > 2^32: int64 for real */
static int32_t eval_load_of(int64_t s, int l, int e) { return load_of(s, l, e) * 2 + 1; }
static float eval_gate_of(int64_t s, int l, int e) { return (float)((s * 5 + l * 17 + e * 11) % 2048) / 2048.0f; }
static float eval_loss_of(int64_t s) { return (float)(5000 + s % 64) / 1024.0f; }

static int append_step(ml_trace *t, int64_t s, ml_err *err) {
    int32_t load[L * E], selected[L * E], topk[L], dropped[L];
    float gate[L * E], bias[L * E], policy[L];
    for (int l = 0; l < L; l++) {
        topk[l] = topk_of(s, l);
        dropped[l] = dropped_of(s, l);
        policy[l] = policy_of(s, l);
        for (int e = 0; e < E; e++) {
            load[l * E + e] = load_of(s, l, e);
            selected[l * E + e] = selected_of(s, l, e);
            gate[l * E + e] = gate_of(s, l, e);
            bias[l * E + e] = bias_of(s, l, e);
        }
    }
    ml_trace_row row = {.step = s, .tokens = tokens_of(s), .loss = loss_of(s), .lr = lr_of(s),
                        .grad_norm = norm_of(s), .policy_loss = policy, .load = load, .selected = selected,
                        .gate_mean = gate, .bias = bias, .topk = topk, .dropped = dropped};
    return trace_append(t, &row, err);
}

static int append_eval(ml_trace *t, int64_t s, ml_err *err) {
    int32_t load[L * E];
    float gate[L * E];
    for (int i = 0; i < L * E; i++) {
        load[i] = eval_load_of(s, i / E, i % E);
        gate[i] = eval_gate_of(s, i / E, i % E);
    }
    return trace_append_eval(t, s, eval_loss_of(s), load, gate, err);
}

/* Reads every dataset of the trace at path and compares it with the formulas: the rows must hold exactly
 * the steps `steps[0..n)` and the evaluations `evals[0..k)`, in that order. */
static void check_contents(const char *what, const char *path, const int64_t *steps, int64_t n, const int64_t *evals,
                           int64_t k) {
    ml_err err = {0};
    ml_trace_info info;
    int rc = trace_info(path, &info, &err);
    CHECK(rc == 0, "%s: trace_info: %s", what, err.msg);
    if (rc) return;
    CHECK(info.schema == ML_TRACE_SCHEMA && info.L == L && info.E == E && !strcmp(info.run_id, RUN_ID),
          "%s: info schema %d L %d E %d run_id %s", what, info.schema, info.L, info.E, info.run_id);
    CHECK(info.nsteps == n && info.nevals == k, "%s: %lld steps and %lld evals, want %lld and %lld", what,
          (long long)info.nsteps, (long long)info.nevals, (long long)n, (long long)k);
    if (info.nsteps != n || info.nevals != k) return;
    char *config = NULL;
    rc = trace_config(path, &config, &err);
    CHECK(rc == 0 && config && !strcmp(config, CONFIG), "%s: config attribute \"%s\" (%s)", what,
          config ? config : "(null)", rc ? err.msg : "");
    free(config);

    size_t rows = (size_t)(n > k ? n : k) + 1;
    int64_t *i64 = calloc(rows, 8);
    float *f32 = calloc(rows * L * E, 4);
    int32_t *i32 = calloc(rows * L * E, 4);
    long bad = 0;
    rc = trace_read_i64(path, "step", 0, n, i64, &err);
    for (int64_t r = 0; r < n && !rc; r++) bad += i64[r] != steps[r];
    CHECK(rc == 0 && bad == 0, "%s: /step: %ld wrong (%s)", what, bad, rc ? err.msg : "");
    rc = trace_read_i64(path, "tokens", 0, n, i64, &err);
    for (int64_t r = 0; r < n && !rc; r++) bad += i64[r] != tokens_of(steps[r]);
    CHECK(rc == 0 && bad == 0, "%s: /tokens: %ld wrong (%s)", what, bad, rc ? err.msg : "");
    const char *scalars[] = {"loss", "lr", "grad_norm"};
    float (*scalar_of[])(int64_t) = {loss_of, lr_of, norm_of};
    for (int i = 0; i < 3; i++) {
        bad = 0;
        rc = trace_read_f32(path, scalars[i], 0, n, f32, &err);
        for (int64_t r = 0; r < n && !rc; r++) bad += f32[r] != scalar_of[i](steps[r]);
        CHECK(rc == 0 && bad == 0, "%s: /%s: %ld wrong (%s)", what, scalars[i], bad, rc ? err.msg : "");
    }
    bad = 0;
    rc = trace_read_rows_f32(path, "policy_loss", 0, n, f32, &err);
    for (int64_t r = 0; r < n && !rc; r++)
        for (int l = 0; l < L; l++) bad += f32[r * L + l] != policy_of(steps[r], l);
    CHECK(rc == 0 && bad == 0, "%s: /policy_loss: %ld wrong (%s)", what, bad, rc ? err.msg : "");
    const char *per_layer[] = {"topk", "dropped"};
    int32_t (*per_layer_of[])(int64_t, int) = {topk_of, dropped_of};
    for (int i = 0; i < 2; i++) {
        bad = 0;
        rc = trace_read_rows_i32(path, per_layer[i], 0, n, i32, &err);
        for (int64_t r = 0; r < n && !rc; r++)
            for (int l = 0; l < L; l++) bad += i32[r * L + l] != per_layer_of[i](steps[r], l);
        CHECK(rc == 0 && bad == 0, "%s: /%s: %ld wrong (%s)", what, per_layer[i], bad, rc ? err.msg : "");
    }
    for (int l = 0; l < L; l++) {
        const char *ints[] = {"load", "selected"};
        int32_t (*int_of[])(int64_t, int, int) = {load_of, selected_of};
        for (int i = 0; i < 2; i++) {
            bad = 0;
            rc = trace_read_layer_i32(path, ints[i], l, 0, n, i32, &err);
            for (int64_t r = 0; r < n && !rc; r++)
                for (int e = 0; e < E; e++) bad += i32[r * E + e] != int_of[i](steps[r], l, e);
            CHECK(rc == 0 && bad == 0, "%s: /%s layer %d: %ld wrong (%s)", what, ints[i], l, bad, rc ? err.msg : "");
        }
        const char *floats[] = {"gate_mean", "bias"};
        float (*float_of[])(int64_t, int, int) = {gate_of, bias_of};
        for (int i = 0; i < 2; i++) {
            bad = 0;
            rc = trace_read_layer_f32(path, floats[i], l, 0, n, f32, &err);
            for (int64_t r = 0; r < n && !rc; r++)
                for (int e = 0; e < E; e++) bad += f32[r * E + e] != float_of[i](steps[r], l, e);
            CHECK(rc == 0 && bad == 0, "%s: /%s layer %d: %ld wrong (%s)", what, floats[i], l, bad, rc ? err.msg : "");
        }
        bad = 0;
        rc = trace_read_layer_i32(path, "eval/load", l, 0, k, i32, &err);
        for (int64_t r = 0; r < k && !rc; r++)
            for (int e = 0; e < E; e++) bad += i32[r * E + e] != eval_load_of(evals[r], l, e);
        CHECK(rc == 0 && bad == 0, "%s: /eval/load layer %d: %ld wrong (%s)", what, l, bad, rc ? err.msg : "");
        bad = 0;
        rc = trace_read_layer_f32(path, "eval/gate_mean", l, 0, k, f32, &err);
        for (int64_t r = 0; r < k && !rc; r++)
            for (int e = 0; e < E; e++) bad += f32[r * E + e] != eval_gate_of(evals[r], l, e);
        CHECK(rc == 0 && bad == 0, "%s: /eval/gate_mean layer %d: %ld wrong (%s)", what, l, bad, rc ? err.msg : "");
    }
    bad = 0;
    rc = trace_read_i64(path, "eval/step", 0, k, i64, &err);
    for (int64_t r = 0; r < k && !rc; r++) bad += i64[r] != evals[r];
    CHECK(rc == 0 && bad == 0, "%s: /eval/step: %ld wrong (%s)", what, bad, rc ? err.msg : "");
    bad = 0;
    rc = trace_read_f32(path, "eval/loss", 0, k, f32, &err);
    for (int64_t r = 0; r < k && !rc; r++) bad += f32[r] != eval_loss_of(evals[r]);
    CHECK(rc == 0 && bad == 0, "%s: /eval/loss: %ld wrong (%s)", what, bad, rc ? err.msg : "");

    /* a window in the middle, across the first (N,L,E) chunk boundary (256 rows) when there is one */
    if (n > 40) {
        int64_t row0 = n > 270 ? 250 : n / 2;
        bad = 0;
        rc = trace_read_layer_i32(path, "load", L - 1, row0, 13, i32, &err);
        for (int64_t r = 0; r < 13 && !rc; r++)
            for (int e = 0; e < E; e++) bad += i32[r * E + e] != load_of(steps[row0 + r], L - 1, e);
        CHECK(rc == 0 && bad == 0, "%s: window of /load: %ld wrong (%s)", what, bad, rc ? err.msg : "");
    }
    free(i64);
    free(f32);
    free(i32);
}

static void expect_error(const char *what, int rc, const ml_err *err, const char *path, const char *reason) {
    CHECK(rc == ML_EINPUT, "%s: returned %d, want ML_EINPUT (%d): %s", what, rc, ML_EINPUT, err->msg);
    CHECK(strstr(err->msg, path) != NULL, "%s: message does not name %s: \"%s\"", what, path, err->msg);
    CHECK(strstr(err->msg, reason) != NULL, "%s: message does not say \"%s\": \"%s\"", what, reason, err->msg);
    printf("ok: %s -> %s\n", what, err->msg);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        printf("FAIL: cannot write %s\n", path);
        exit(1);
    }
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if (*s == '\n') fputs("\\n", f);
        else if ((unsigned char)*s < 0x20) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

/* What tests/test_trace_h5py.py checks the kept trace against: shape, attributes and layer 1's per-step
 * MaxVio computed by analysis/metrics.c from the loads the C readers return. */
static void write_expected(const char *trace_path, int64_t n, int64_t k) {
    char path[4300];
    snprintf(path, sizeof path, "%s.expected.json", trace_path);
    int32_t *load = malloc((size_t)n * E * sizeof *load);
    ml_err err = {0};
    int rc = trace_read_layer_i32(trace_path, "load", 1, 0, n, load, &err);
    CHECK(rc == 0, "reading layer 1 for the expected MaxVio: %s", err.msg);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL, "cannot write %s", path);
    if (rc || !f) {
        free(load);
        if (f) fclose(f);
        return;
    }
    fprintf(f, "{\"schema_version\": %d, \"run_id\": ", ML_TRACE_SCHEMA);
    json_string(f, RUN_ID);
    fprintf(f, ", \"config\": ");
    json_string(f, CONFIG);
    fprintf(f, ", \"layers\": %d, \"experts\": %d, \"nsteps\": %lld, \"nevals\": %lld, \"eval_every\": %d,\n "
               "\"maxvio_layer\": 1, \"maxvio\": [", L, E, (long long)n, (long long)k, EVAL_EVERY);
    for (int64_t r = 0; r < n; r++) {
        double loads[E];
        for (int e = 0; e < E; e++) loads[e] = load[r * E + e];
        ml_load_metrics m;
        metrics_compute(&m, loads, E);
        fprintf(f, "%s%.17g", r ? ", " : "", m.maxvio);
    }
    fprintf(f, "]}\n");
    CHECK(fclose(f) == 0, "writing %s", path);
    free(load);
    printf("kept %s and %s\n", trace_path, path);
}

/* ---- the cases */

static void round_trip(const char *keep) {
    const char *path = keep ? keep : path_in("round_trip.h5");
    ml_err err = {0};
    ml_trace *t;
    int rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, -1, &err);
    CHECK(rc == 0, "trace_open: %s", err.msg);
    if (rc) return;
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0, "%s was left behind", tmp);
    ml_trace_info info;
    rc = trace_info(path, &info, &err);
    CHECK(rc == 0 && info.nsteps == 0 && info.nevals == 0, "a new trace: rc %d, %lld steps (%s)", rc,
          (long long)info.nsteps, err.msg);

    /* 600 rows cross two (N,L,E) chunk boundaries (256 rows) and evaluations every 7 steps one of theirs (64) */
    enum { N = 600 };
    static const int flush_after[] = {0, 1, 17, 100, 101, 255, 256, 300, 530, 1023, -1}; /* 1023: past the end */
    int64_t steps[N], evals[N];
    int64_t k = 0, flushed = 0;
    const int *next_flush = flush_after;
    for (int64_t s = 0; s < N; s++) {
        rc = append_step(t, s, &err);
        CHECK(rc == 0, "append step %lld: %s", (long long)s, err.msg);
        steps[s] = s;
        if (s % EVAL_EVERY == 0) {
            rc = append_eval(t, s, &err);
            CHECK(rc == 0, "append eval %lld: %s", (long long)s, err.msg);
            evals[k++] = s;
        }
        if (s == *next_flush) {
            rc = trace_flush(t, &err);
            CHECK(rc == 0, "flush at %lld: %s", (long long)s, err.msg);
            flushed = s + 1;
            next_flush++;
        }
        /* between flushes the file is closed and holds exactly the flushed rows */
        if (s == 150 || s == 400) {
            rc = trace_info(path, &info, &err);
            CHECK(rc == 0 && info.nsteps == flushed, "between flushes: %lld steps on disk, want %lld (%s)",
                  (long long)info.nsteps, (long long)flushed, err.msg);
        }
    }
    rc = trace_flush(t, &err);
    CHECK(rc == 0, "flush: %s", err.msg);
    rc = trace_flush(t, &err); /* nothing buffered */
    CHECK(rc == 0, "an empty flush: %s", err.msg);

    rc = append_step(t, N - 1, &err);
    CHECK(rc == ML_EINPUT && strstr(err.msg, "must increase") && strstr(err.msg, path),
          "a repeated step: rc %d \"%s\"", rc, err.msg);
    rc = trace_close(t, &err);
    CHECK(rc == 0, "trace_close: %s", err.msg);
    check_contents("round trip", path, steps, N, evals, k);

    /* reader misuse */
    int64_t i64[4];
    float f32[64];
    rc = trace_read_i64(path, "step", N - 2, 3, i64, &err);
    expect_error("rows past the end", rc, &err, path, "out of range");
    rc = trace_read_i64(path, "step", -1, 1, i64, &err);
    expect_error("a negative row", rc, &err, path, "out of range");
    rc = trace_read_i64(path, "loss", 0, 1, i64, &err);
    expect_error("a float column read as int64", rc, &err, path, "float32");
    rc = trace_read_layer_f32(path, "gate_mean", L, 0, 1, f32, &err);
    expect_error("a layer past the end", rc, &err, path, "layer 3 is out of range");
    rc = trace_read_layer_f32(path, "gate_mean", -1, 0, 1, f32, &err);
    expect_error("a negative layer", rc, &err, path, "out of range");
    rc = trace_read_rows_f32(path, "no_such", 0, 1, f32, &err);
    expect_error("an unknown dataset", rc, &err, path, "no dataset \"no_such\"");
    rc = trace_read_i64(path, "step", N, 0, i64, &err);
    CHECK(rc == 0, "reading zero rows at the end: %s", err.msg);

    if (keep) write_expected(keep, N, k);
    else unlink(path);
}

static void resume(void) {
    const char *path = path_in("resume.h5");
    ml_err err = {0};
    ml_trace *t;
    int rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, -1, &err);
    CHECK(rc == 0, "trace_open: %s", err.msg);
    if (rc) return;
    for (int64_t s = 0; s <= 100; s++) {
        rc |= append_step(t, s, &err);
        if (s % 50 == 0) rc |= append_eval(t, s, &err);
    }
    rc |= trace_flush(t, &err);
    for (int64_t s = 101; s <= 120; s++) rc |= append_step(t, s, &err);
    rc |= append_eval(t, 120, &err);
    CHECK(rc == 0, "writing steps 0..120: %s", err.msg);
    trace_free(t); /* the crash: steps 101..120 were never flushed */

    /* the checkpoint was at step 90: steps 91..100 and the evaluation at 100 go */
    rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, 90, &err);
    CHECK(rc == 0, "resume at 90: %s", err.msg);
    if (rc) return;
    ml_trace_info info;
    rc = trace_info(path, &info, &err);
    CHECK(rc == 0 && info.nsteps == 91 && info.nevals == 2, "after the cut: %lld steps, %lld evals, want 91, 2 (%s)",
          (long long)info.nsteps, (long long)info.nevals, err.msg);
    rc = append_step(t, 90, &err);
    CHECK(rc == ML_EINPUT, "a step the trace kept (90) appended again: rc %d", rc);
    rc = 0;
    for (int64_t s = 91; s <= 150; s++) {
        rc |= append_step(t, s, &err);
        if (s % 50 == 0) rc |= append_eval(t, s, &err);
        if (s == 133) rc |= trace_flush(t, &err);
    }
    rc |= trace_close(t, &err);
    CHECK(rc == 0, "continuing to 150: %s", err.msg);
    int64_t steps[151], evals[] = {0, 50, 100, 150};
    for (int s = 0; s <= 150; s++) steps[s] = s;
    check_contents("resumed", path, steps, 151, evals, 4);

    /* a resume point past the end keeps everything; one before the start keeps nothing */
    rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, 1000, &err);
    CHECK(rc == 0, "resume past the end: %s", err.msg);
    trace_close(t, &err);
    check_contents("resumed past the end", path, steps, 151, evals, 4);
    rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, 0, &err);
    CHECK(rc == 0, "resume at 0: %s", err.msg);
    trace_close(t, &err);
    check_contents("resumed at 0", path, steps, 1, evals, 1);
    unlink(path);

    /* the trace was lost: a resumed run starts a new one */
    const char *lost = path_in("lost.h5");
    rc = trace_open(&t, lost, RUN_ID, CONFIG, L, E, 70, &err);
    CHECK(rc == 0, "resume without a trace: %s", err.msg);
    for (int64_t s = 71; s <= 80 && rc == 0; s++) rc = append_step(t, s, &err);
    rc |= trace_close(t, &err);
    CHECK(rc == 0, "writing the new trace: %s", err.msg);
    check_contents("resumed without a trace", lost, steps + 71, 10, NULL, 0);
    unlink(lost);
}

/* What a kill inside a flush can leave (HDF5 reuses the space of the chunks it rewrites): the last chunk of
 * /load layer 1 overwritten. Readers of it and a resume fail with ML_EINPUT naming the file, nothing crashes,
 * and the untouched layers still read. */
static void damaged(void) {
    const char *path = path_in("damaged.h5");
    ml_err err = {0};
    ml_trace *t;
    int rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, -1, &err);
    for (int64_t s = 0; s < 300 && rc == 0; s++) rc = append_step(t, s, &err);
    rc |= trace_close(t, &err);
    CHECK(rc == 0, "writing the trace to damage: %s", err.msg);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, "load", H5P_DEFAULT);
    hsize_t offset[3] = {256, 1, 0}, size = 0;
    haddr_t addr = 0;
    unsigned mask = 0;
    herr_t hrc = H5Dget_chunk_info_by_coord(d, offset, &mask, &addr, &size);
    H5Dclose(d);
    H5Fclose(f);
    CHECK(hrc >= 0 && size > 0, "no chunk at row 256 of /load layer 1");
    if (hrc < 0 || size == 0) return;
    int fd = open(path, O_WRONLY);
    char junk[64];
    memset(junk, 0x5a, sizeof junk);
    CHECK(fd >= 0 && pwrite(fd, junk, sizeof junk, (off_t)addr) == (ssize_t)sizeof junk, "cannot damage %s", path);
    if (fd >= 0) close(fd);

    int32_t load[300 * E];
    rc = trace_read_layer_i32(path, "load", 1, 0, 300, load, &err);
    expect_error("reading a damaged chunk", rc, &err, path, "damaged trace?");
    rc = trace_read_layer_i32(path, "load", 0, 0, 300, load, &err);
    CHECK(rc == 0, "an undamaged layer of a damaged trace: %s", err.msg);
    rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, 280, &err);
    expect_error("resuming a damaged trace", rc, &err, path, "move it away to resume without it");
    ml_trace_info info;
    rc = trace_info(path, &info, &err);
    CHECK(rc == 0 && info.nsteps == 300, "a refused resume changed the damaged trace (%s)", err.msg);
    unlink(path);
}

/* A child writes and flushes 50 steps, then keeps appending without flushing until the parent kills it. */
static void kill9(void) {
    const char *path = path_in("killed.h5");
    int ready[2];
    if (pipe(ready) != 0) {
        CHECK(0, "pipe: %s", strerror(errno));
        return;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        close(ready[0]);
        ml_err err = {0};
        ml_trace *t;
        int rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, -1, &err);
        for (int64_t s = 0; s < 50 && rc == 0; s++) {
            rc = append_step(t, s, &err);
            if (!rc && (s == 19 || s == 49)) rc = trace_flush(t, &err);
            if (!rc && s == 30) rc = append_eval(t, s, &err);
        }
        if (rc) {
            printf("child: %s\n", err.msg);
            _exit(1);
        }
        if (write(ready[1], "r", 1) != 1) _exit(1);
        for (int64_t s = 50; s < 50 + 60000; s++) { /* a minute at most, should the parent die */
            if (append_step(t, s, &err)) _exit(1);
            usleep(1000);
        }
        _exit(2);
    }
    close(ready[1]);
    char c;
    CHECK(pid > 0 && read(ready[0], &c, 1) == 1, "the writer child did not get to step 50");
    close(ready[0]);
    int64_t steps[50], evals[] = {30};
    for (int s = 0; s < 50; s++) steps[s] = s;
    usleep(20000);
    check_contents("read while the writer runs", path, steps, 50, evals, 1);
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "the writer child was not killed (status %d)", status);
    check_contents("after kill -9", path, steps, 50, evals, 1);
    unlink(path);
}

/* A reader (another process: HDF5 shares opens within one) holding the file open does not block the writer's
 * flushes, however long it holds it. */
static void locked(void) {
    const char *path = path_in("locked.h5");
    ml_err err = {0};
    ml_trace *t;
    int rc = trace_open(&t, path, RUN_ID, CONFIG, L, E, -1, &err);
    CHECK(rc == 0, "trace_open: %s", err.msg);
    if (rc) return;
    int64_t steps[40];
    for (int s = 0; s < 40; s++) steps[s] = s;
    for (int hold_ms = 300, s = 0; hold_ms <= 3000; hold_ms += 2700) {
        int ready[2];
        if (pipe(ready) != 0) return;
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
            if (write(ready[1], "r", 1) != 1) _exit(1);
            usleep(hold_ms * 1000);
            H5Fclose(f);
            _exit(f >= 0 ? 0 : 1);
        }
        close(ready[1]);
        char c;
        CHECK(read(ready[0], &c, 1) == 1, "the reader child did not start");
        close(ready[0]);
        for (int end = s + 20; s < end; s++) append_step(t, s, &err);
        rc = trace_flush(t, &err);
        /* the writer takes no file lock (trace_open), so a reader that keeps the file open never blocks it */
        CHECK(rc == 0, "a flush while a reader holds the file %d ms: %s", hold_ms, err.msg);
        int status = 0;
        waitpid(pid, &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the reader child failed");
    }
    rc = trace_close(t, &err);
    CHECK(rc == 0, "trace_close: %s", err.msg);
    check_contents("after flushes beside a reader", path, steps, 40, NULL, 0);
    unlink(path);
}

static void bad_inputs(void) {
    ml_err err = {0};
    ml_trace_info info;
    ml_trace *t = NULL;
    int rc;

    const char *text = path_in("text.h5");
    write_file(text, "step,load\n0,1\n");
    rc = trace_info(text, &info, &err);
    expect_error("a text file", rc, &err, text, "not an HDF5 file");
    rc = trace_open(&t, text, RUN_ID, CONFIG, L, E, 10, &err);
    expect_error("resuming onto a text file", rc, &err, text, "not an HDF5 file");
    CHECK(t == NULL, "a failed open left a handle");

    const char *empty = path_in("empty.h5");
    write_file(empty, "");
    rc = trace_info(empty, &info, &err);
    expect_error("an empty file", rc, &err, empty, "not an HDF5 file");

    const char *missing = path_in("missing.h5");
    rc = trace_info(missing, &info, &err);
    expect_error("a missing file", rc, &err, missing, "No such file");
    int32_t load[4];
    rc = trace_read_layer_i32(missing, "load", 0, 0, 1, load, &err);
    expect_error("reading a missing file", rc, &err, missing, "No such file");

    rc = trace_info(dir, &info, &err);
    expect_error("a folder", rc, &err, dir, "not a regular file");

    const char *foreign = path_in("foreign.h5");
    hid_t f = H5Fcreate(foreign, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[1] = {10};
    hid_t s = H5Screate_simple(1, dims, NULL);
    hid_t d = H5Dcreate2(f, "data", H5T_STD_I32LE, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dclose(d);
    H5Sclose(s);
    H5Fclose(f);
    rc = trace_info(foreign, &info, &err);
    expect_error("an HDF5 file that is not a trace", rc, &err, foreign, "without a schema_version");
    char *config = NULL;
    rc = trace_config(foreign, &config, &err);
    expect_error("the config of a foreign file", rc, &err, foreign, "not a moelab trace");
    rc = trace_open(&t, foreign, RUN_ID, CONFIG, L, E, 5, &err);
    expect_error("resuming onto a foreign HDF5 file", rc, &err, foreign, "not a moelab trace");

    const char *other = path_in("other.h5");
    rc = trace_open(&t, other, "another-run", CONFIG, L, E, -1, &err);
    for (int64_t st = 0; st < 5 && rc == 0; st++) rc = append_step(t, st, &err);
    rc |= trace_close(t, &err);
    CHECK(rc == 0, "writing another run's trace: %s", err.msg);
    rc = trace_open(&t, other, RUN_ID, CONFIG, L, E, 3, &err);
    expect_error("resuming another run's trace", rc, &err, other, "belongs to run \"another-run\"");
    rc = trace_open(&t, other, "another-run", CONFIG, L, E + 1, 3, &err);
    expect_error("resuming with more experts", rc, &err, other, "3 layers x 5 experts");
    rc = trace_open(&t, other, "another-run", CONFIG, L + 2, E, 3, &err);
    expect_error("resuming with more layers", rc, &err, other, "the resumed run 5 x 5");
    rc = trace_info(other, &info, &err);
    CHECK(rc == 0 && info.nsteps == 5, "a refused resume changed the trace: %lld steps (%s)", (long long)info.nsteps,
          err.msg);

    /* a newer schema: written by a later moelab */
    f = H5Fopen(other, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t a = H5Aopen(f, "schema_version", H5P_DEFAULT);
    int v = ML_TRACE_SCHEMA + 1;
    H5Awrite(a, H5T_NATIVE_INT, &v);
    H5Aclose(a);
    H5Fclose(f);
    rc = trace_info(other, &info, &err);
    expect_error("a newer schema", rc, &err, other, "newer than this moelab reads");
    rc = trace_open(&t, other, "another-run", CONFIG, L, E, 3, &err);
    expect_error("resuming a newer schema", rc, &err, other, "newer");

    /* a truncated trace: the HDF5 signature is there, the rest is not */
    const char *cut = path_in("cut.h5");
    rc = trace_open(&t, cut, RUN_ID, CONFIG, L, E, -1, &err);
    for (int64_t st = 0; st < 300 && rc == 0; st++) rc = append_step(t, st, &err);
    rc |= trace_close(t, &err);
    struct stat sb;
    CHECK(rc == 0 && stat(cut, &sb) == 0, "writing a trace to cut: %s", err.msg);
    CHECK(truncate(cut, sb.st_size / 2) == 0, "truncate: %s", strerror(errno));
    rc = trace_info(cut, &info, &err);
    if (rc == 0) rc = trace_read_layer_i32(cut, "load", 0, 0, 1, load, &err);
    expect_error("a truncated trace", rc, &err, cut, "");

    const char *nowhere = "/nonexistent-folder/moelab/trace.h5";
    rc = trace_open(&t, nowhere, RUN_ID, CONFIG, L, E, -1, &err);
    expect_error("a new trace in a missing folder", rc, &err, nowhere, "cannot create");
    rc = trace_open(&t, path_in("zero.h5"), RUN_ID, CONFIG, 0, E, -1, &err);
    expect_error("zero layers", rc, &err, path_in("zero.h5"), "at least one layer");

    const char *names[] = {"text.h5", "empty.h5", "foreign.h5", "other.h5", "cut.h5"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) unlink(path_in(names[i]));
}

int main(int argc, char **argv) {
    const char *keep = NULL;
    if (argc == 3 && !strcmp(argv[1], "--keep")) keep = argv[2];
    else if (argc != 1) {
        fprintf(stderr, "usage: test_trace [--keep TRACE]\n");
        return 2;
    }
    const char *base = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/moelab_test_trace_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir)) {
        printf("FAIL: cannot create a temporary folder %s\ntrace: 0 passed, 1 failed\n", dir);
        return 1;
    }
    /* HDF5 must print nothing: every error is a value. Its stderr goes to a file checked at the end. */
    char stderr_path[4200];
    snprintf(stderr_path, sizeof stderr_path, "%s/stderr.txt", dir);
    printf("stderr goes to %s until the end (a crash leaves its message there)\n", stderr_path);
    fflush(stdout);
    fflush(stderr);
    int saved = dup(2), fd = open(stderr_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    close(fd);

    round_trip(keep);
    resume();
    bad_inputs();
    damaged();
    kill9();
    locked();

    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    struct stat sb;
    CHECK(stat(stderr_path, &sb) == 0 && sb.st_size == 0, "something was printed to stderr (%s, %lld bytes)",
          stderr_path, (long long)sb.st_size);
    if (sb.st_size == 0) {
        unlink(stderr_path);
    } else {
        FILE *f = fopen(stderr_path, "r");
        char line[1024];
        while (f && fgets(line, sizeof line, f)) printf("stderr: %s", line);
        if (f) fclose(f);
    }
    rmdir(dir);
    printf("trace: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
