/* test_rundb.c: the run database: schema creation, a run's round trip (params equal to config_foreach's list,
 * status changes, metrics, summary, queries), idempotent and conflicting adds, four processes writing one new
 * file at once, reaping of dead and silent runs, and the files rundb_open must refuse. Works in a temporary
 * folder (TMPDIR or /tmp) that it removes at the end. */
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "rundb.h"

#include "check.h"

static char tmpdir[512];

static void path_in_tmp(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", tmpdir, name); }

/* First column of the first row as text ("NULL" for SQL NULL, "" when there is no row). */
typedef struct {
    char text[4096];
    int rows;
} first_cell;

static int keep_first(void *ctx, int ncol, char **names, char **values) {
    (void)names;
    first_cell *c = ctx;
    if (c->rows++ == 0 && ncol > 0) snprintf(c->text, sizeof c->text, "%s", values[0] ? values[0] : "NULL");
    return 0;
}

static const char *cell(ml_rundb *db, const char *sql) {
    static first_cell c;
    memset(&c, 0, sizeof c);
    ml_err err = {0};
    if (rundb_query(db, sql, keep_first, &c, &err)) snprintf(c.text, sizeof c.text, "ERROR %s", err.msg);
    return c.text;
}

static long cell_long(ml_rundb *db, const char *sql) { return strtol(cell(db, sql), NULL, 10); }

/* Same, through sqlite directly (for files rundb refuses to open). */
static void raw_exec(const char *path, const char *sql) {
    sqlite3 *s;
    if (sqlite3_open(path, &s) != SQLITE_OK || sqlite3_exec(s, sql, NULL, NULL, NULL) != SQLITE_OK)
        printf("raw_exec %s: %s\n", path, sqlite3_errmsg(s));
    sqlite3_close(s);
}

static void raw_cell(const char *path, const char *sql, char *out, size_t cap) {
    sqlite3 *s;
    sqlite3_stmt *st;
    out[0] = 0;
    if (sqlite3_open(path, &s) == SQLITE_OK && sqlite3_prepare_v2(s, sql, -1, &st, NULL) == SQLITE_OK) {
        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
            snprintf(out, cap, "%s", (const char *)sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
    }
    sqlite3_close(s);
}

static char *config_text_of(const ml_config *cfg) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    config_write(cfg, f);
    fclose(f);
    return text;
}

typedef struct {
    char keys[256][64];
    char values[256][1100];
    int n;
} key_list;

static void collect(const char *key, const char *value, void *ctx) {
    key_list *l = ctx;
    if (l->n < 256) {
        snprintf(l->keys[l->n], sizeof l->keys[0], "%s", key);
        snprintf(l->values[l->n], sizeof l->values[0], "%s", value);
    }
    l->n++;
}

static int count_rows(void *ctx, int ncol, char **names, char **values) {
    (void)ncol, (void)names, (void)values;
    ++*(int *)ctx;
    return 0;
}

static int stop_after_one(void *ctx, int ncol, char **names, char **values) {
    (void)ncol, (void)names, (void)values;
    ++*(int *)ctx;
    return 1;
}

typedef struct {
    int ncol, rows;
    char names[4][32];
    int null_seen;
} shape;

static int record_shape(void *ctx, int ncol, char **names, char **values) {
    shape *s = ctx;
    s->ncol = ncol;
    for (int i = 0; i < ncol && i < 4; i++) snprintf(s->names[i], sizeof s->names[i], "%s", names[i]);
    for (int i = 0; i < ncol; i++) s->null_seen |= values[i] == NULL;
    s->rows++;
    return 0;
}

static void test_hash(void) {
    char h[17];
    rundb_config_hash("", h);
    CHECK(!strcmp(h, "cbf29ce484222325"), "FNV-1a of \"\" is %s", h);
    rundb_config_hash("a", h);
    CHECK(!strcmp(h, "af63dc4c8601ec8c"), "FNV-1a of \"a\" is %s", h);
    rundb_config_hash("foobar", h);
    CHECK(!strcmp(h, "85944171f73967e8"), "FNV-1a of \"foobar\" is %s", h);
}

static void test_round_trip(void) {
    char path[600];
    path_in_tmp(path, sizeof path, "runs.db");
    ml_rundb *db;
    ml_err err = {0};
    CHECK(rundb_open(&db, path, 0, &err) == 0, "open new: %s", err.msg);
    if (!db) return;
    CHECK(!strcmp(cell(db, "PRAGMA user_version"), "1"), "user_version %s", cell(db, "PRAGMA user_version"));
    CHECK(!strcmp(cell(db, "PRAGMA journal_mode"), "wal"), "journal_mode %s", cell(db, "PRAGMA journal_mode"));
    CHECK(!strcmp(cell(db, "PRAGMA foreign_keys"), "1"), "foreign_keys on");
    CHECK(cell_long(db, "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name IN ('runs_experiment', "
                        "'runs_status', 'params_key_value', 'metrics_run_key')") == 4, "indexes");

    CHECK(rundb_add_experiment(db, "sweep1", "aux coefficient sweep", "experiments/sweep1.yaml", &err) == 0,
          "add experiment: %s", err.msg);
    CHECK(rundb_add_experiment(db, "sweep1", "other text", NULL, &err) == 0, "add experiment again: %s", err.msg);
    CHECK(cell_long(db, "SELECT count(*) FROM experiments") == 1, "experiment added once");
    CHECK(!strcmp(cell(db, "SELECT description FROM experiments"), "aux coefficient sweep"), "first description kept");
    CHECK(rundb_add_experiment(db, "", NULL, NULL, &err) == 0 && cell_long(db, "SELECT count(*) FROM experiments") == 1,
          "empty experiment name is no experiment");

    ml_config cfg;
    config_preset(&cfg, "tiny", NULL);
    config_set(&cfg, "balance.aux_coef=0.02", &err);
    char *text = config_text_of(&cfg);
    char hash[17];
    rundb_config_hash(text, hash);
    CHECK(rundb_add_run(db, "r1", "sweep1", "aux 0.02", &cfg, text, hash, "runs/r1", "cpu", 1, &err) == 0,
          "add run: %s", err.msg);
    CHECK(!strcmp(cell(db, "SELECT status FROM runs WHERE id = 'r1'"), "queued"), "new run is queued");
    CHECK(!strcmp(cell(db, "SELECT config_hash FROM runs WHERE id = 'r1'"), hash), "hash stored");
    CHECK(!strcmp(cell(db, "SELECT config FROM runs WHERE id = 'r1'"), text), "config text stored");
    CHECK(!strcmp(cell(db, "SELECT started IS NULL AND finished IS NULL AND host IS NULL FROM runs"), "1"),
          "not started yet");
    const char *created = cell(db, "SELECT created FROM runs WHERE id = 'r1'");
    CHECK(strlen(created) == 24 && created[10] == 'T' && created[23] == 'Z', "created is ISO-8601 UTC: %s", created);
    CHECK(!strcmp(cell(db, "SELECT backend || ' ' || world_size || ' ' || run_dir || ' ' || experiment || ' ' || "
                           "name FROM runs"), "cpu 1 runs/r1 sweep1 aux 0.02"), "run columns: %s",
          cell(db, "SELECT backend || ' ' || world_size || ' ' || run_dir || ' ' || experiment FROM runs"));

    /* params are config_foreach's list, key for key and value for value */
    static key_list keys;
    keys.n = 0;
    config_foreach(&cfg, collect, &keys);
    CHECK(cell_long(db, "SELECT count(*) FROM params WHERE run = 'r1'") == keys.n, "one param per key (%d)", keys.n);
    int same = 0;
    for (int i = 0; i < keys.n && i < 256; i++) {
        char sql[1400];
        snprintf(sql, sizeof sql, "SELECT value FROM params WHERE run = 'r1' AND key = '%s'", keys.keys[i]);
        const char *v = cell(db, sql);
        if (!strcmp(v, keys.values[i])) same++;
        else printf("  param %s: db '%s', config_foreach '%s'\n", keys.keys[i], v, keys.values[i]);
    }
    CHECK(same == keys.n, "%d of %d params equal config_foreach's values", same, keys.n);
    const char *aux = cell(db, "SELECT value FROM params WHERE run = 'r1' AND key = 'balance.aux_coef'");
    CHECK(strtof(aux, NULL) == 0.02f, "balance.aux_coef param is %s", aux);
    CHECK(!strcmp(cell(db, "SELECT value FROM params WHERE run = 'r1' AND key = 'model.experts'"), "8"),
          "model.experts param");

    /* idempotent add, conflicting add, unknown experiment, run without config text */
    CHECK(rundb_set_status(db, "r1", "running", NULL, &err) == 0, "running: %s", err.msg);
    CHECK(rundb_add_run(db, "r1", "sweep1", "aux 0.02", &cfg, text, hash, "runs/r1", "cpu", 1, &err) == 0,
          "same hash again is a no-op: %s", err.msg);
    CHECK(!strcmp(cell(db, "SELECT status FROM runs WHERE id = 'r1'"), "running"), "no-op add leaves the status");
    CHECK(cell_long(db, "SELECT count(*) FROM params") == keys.n, "no-op add leaves params");
    ml_config other = cfg;
    config_set(&other, "balance.aux_coef=0.05", &err);
    char *other_text = config_text_of(&other);
    err.msg[0] = 0;
    CHECK(rundb_add_run(db, "r1", "sweep1", "aux 0.05", &other, other_text, NULL, NULL, "cpu", 1, &err) == ML_EINPUT &&
              strstr(err.msg, "r1 exists with another config") && strstr(err.msg, path),
          "conflicting add: %s", err.msg);
    CHECK(cell_long(db, "SELECT count(*) FROM runs") == 1, "conflicting add inserted nothing");
    CHECK(rundb_add_run(db, "r2", "nosuch", NULL, &other, other_text, NULL, NULL, "cpu", 1, &err) == ML_EINPUT &&
              strstr(err.msg, "unknown experiment 'nosuch'"), "unknown experiment: %s", err.msg);
    CHECK(cell_long(db, "SELECT count(*) FROM params") == keys.n, "failed add rolled back");
    CHECK(rundb_add_run(db, "r2", NULL, NULL, &other, NULL, NULL, NULL, NULL, 0, &err) == 0, "ad-hoc run: %s", err.msg);
    CHECK(rundb_add_run(db, "r2", NULL, NULL, &other, NULL, NULL, NULL, NULL, 0, &err) == 0,
          "ad-hoc run again (hash of the params): %s", err.msg);
    CHECK(rundb_add_run(db, "r2", NULL, NULL, &cfg, NULL, NULL, NULL, NULL, 0, &err) == ML_EINPUT,
          "ad-hoc run with other params conflicts");
    CHECK(!strcmp(cell(db, "SELECT experiment IS NULL AND length(config_hash) = 16 FROM runs WHERE id = 'r2'"), "1"),
          "ad-hoc run has no experiment and a hash");
    CHECK(rundb_add_run(db, "", NULL, NULL, &cfg, NULL, NULL, NULL, NULL, 0, &err) == ML_EINPUT, "empty id refused");

    /* status transitions */
    char host[256] = "", sql[512];
    gethostname(host, sizeof host - 1);
    snprintf(sql, sizeof sql, "SELECT host = '%s' AND pid = %ld AND started IS NOT NULL AND heartbeat IS NOT NULL "
             "AND finished IS NULL FROM runs WHERE id = 'r1'", host, (long)getpid());
    CHECK(!strcmp(cell(db, sql), "1"), "running records host, pid, started, heartbeat");
    char started[64];
    snprintf(started, sizeof started, "%s", cell(db, "SELECT started FROM runs WHERE id = 'r1'"));
    CHECK(rundb_heartbeat(db, "r1", &err) == 0, "heartbeat: %s", err.msg);
    CHECK(rundb_set_trace_path(db, "r1", "runs/r1/trace.h5", &err) == 0 &&
              !strcmp(cell(db, "SELECT trace_path FROM runs WHERE id = 'r1'"), "runs/r1/trace.h5"), "trace path");
    CHECK(rundb_set_status(db, "r1", "failed", "NaN loss at step 12", &err) == 0, "failed: %s", err.msg);
    CHECK(!strcmp(cell(db, "SELECT status || '|' || error || '|' || (finished IS NOT NULL) FROM runs WHERE id = 'r1'"),
                  "failed|NaN loss at step 12|1"), "failed records finished and error");
    CHECK(rundb_set_status(db, "r1", "running", NULL, &err) == 0, "resume: %s", err.msg);
    CHECK(!strcmp(cell(db, "SELECT started FROM runs WHERE id = 'r1'"), started), "a resumed run keeps started");
    CHECK(!strcmp(cell(db, "SELECT (error IS NULL) || (finished IS NULL) FROM runs WHERE id = 'r1'"), "11"),
          "a resumed run drops the old error");
    CHECK(rundb_set_status(db, "r1", "finished", NULL, &err) == 0, "finished: %s", err.msg);
    CHECK(!strcmp(cell(db, "SELECT status || '|' || (error IS NULL) || '|' || (finished >= started) FROM runs "
                           "WHERE id = 'r1'"), "finished|1|1"), "finished");
    err.msg[0] = 0;
    CHECK(rundb_set_status(db, "r1", "done", NULL, &err) == ML_EINPUT && strstr(err.msg, "unknown status 'done'"),
          "bad status: %s", err.msg);
    CHECK(rundb_set_status(db, "nosuch", "running", NULL, &err) == ML_EINPUT && strstr(err.msg, "no such run"),
          "status of an unknown run: %s", err.msg);
    CHECK(rundb_heartbeat(db, "nosuch", &err) == ML_EINPUT, "heartbeat of an unknown run");

    /* metrics and summary */
    const char *mkeys[] = {"loss", "aux_loss", "maxvio"};
    double v0[] = {5.5, 0.01, 1.25}, v10[] = {4.0, 0.02, NAN}, v10b[] = {3.5};
    CHECK(rundb_log_metrics(db, "r1", 0, 3, mkeys, v0, &err) == 0, "metrics step 0: %s", err.msg);
    CHECK(rundb_log_metrics(db, "r1", 10, 3, mkeys, v10, &err) == 0, "metrics step 10: %s", err.msg);
    CHECK(rundb_log_metrics(db, "r1", 10, 1, mkeys, v10b, &err) == 0, "metric replaced: %s", err.msg);
    CHECK(rundb_log_metrics(db, "r1", 20, 0, mkeys, v10b, &err) == 0, "no metrics");
    CHECK(cell_long(db, "SELECT count(*) FROM metrics WHERE run = 'r1'") == 6, "6 metric rows");
    CHECK(!strcmp(cell(db, "SELECT value FROM metrics WHERE run = 'r1' AND step = 10 AND key = 'loss'"), "3.5"),
          "INSERT OR REPLACE keeps the last value");
    CHECK(!strcmp(cell(db, "SELECT value FROM metrics WHERE step = 10 AND key = 'maxvio'"), "NULL"), "NaN is NULL");
    CHECK(rundb_log_metrics(db, "nosuch", 0, 3, mkeys, v0, &err) == ML_EINPUT && strstr(err.msg, "no such run"),
          "metrics of an unknown run: %s", err.msg);
    CHECK(rundb_set_summary(db, "r1", "val_loss", 3.75, &err) == 0 && rundb_set_summary(db, "r1", "val_loss", 3.25, &err) == 0
              && rundb_set_summary(db, "r1", "maxvio_global", 0.5, &err) == 0, "summary: %s", err.msg);
    CHECK(!strcmp(cell(db, "SELECT group_concat(key || '=' || value, ',') FROM (SELECT * FROM summary ORDER BY key)"),
                  "maxvio_global=0.5,val_loss=3.25"), "summary upserted: %s",
          cell(db, "SELECT group_concat(key || '=' || value) FROM summary"));
    CHECK(rundb_set_summary(db, "nosuch", "x", 1, &err) == ML_EINPUT, "summary of an unknown run");

    /* queries: names, NULLs, several statements, early stop, errors */
    shape s = {0};
    CHECK(rundb_query(db, "SELECT r.id AS run, p.value AS aux, s.value AS val_loss, r.error FROM runs r "
                          "JOIN params p ON p.run = r.id AND p.key = 'balance.aux_coef' "
                          "LEFT JOIN summary s ON s.run = r.id AND s.key = 'val_loss' ORDER BY r.id",
                      record_shape, &s, &err) == 0, "join query: %s", err.msg);
    CHECK(s.rows == 2 && s.ncol == 4 && !strcmp(s.names[0], "run") && !strcmp(s.names[1], "aux") &&
              !strcmp(s.names[2], "val_loss") && s.null_seen, "query shape: %d rows, %d cols, %s %s", s.rows, s.ncol,
          s.names[0], s.names[1]);
    int n = 0;
    CHECK(rundb_query(db, "SELECT * FROM metrics", stop_after_one, &n, &err) == 0 && n == 1, "row() stops the query");
    n = 0;
    CHECK(rundb_query(db, "  -- comment\n SELECT 1; SELECT 2 UNION SELECT 3;  ", count_rows, &n, &err) == 0 && n == 3,
          "several statements: %d rows", n);
    CHECK(rundb_query(db, "SELEC 1", count_rows, &n, &err) == ML_EINPUT && strstr(err.msg, "syntax error"),
          "syntax error: %s", err.msg);
    CHECK(rundb_query(db, "INSERT INTO runs (id, status, created) VALUES ('x', 'bogus', 'now')", NULL, NULL, &err) ==
              ML_EINPUT && strstr(err.msg, "CHECK constraint"), "status CHECK: %s", err.msg);
    CHECK(rundb_query(db, "INSERT INTO metrics VALUES ('nosuch', 1, 'loss', 1.0)", NULL, NULL, &err) == ML_EINPUT &&
              strstr(err.msg, "FOREIGN KEY"), "foreign keys enforced: %s", err.msg);
    rundb_close(db);

    /* reopen: same schema, same rows */
    CHECK(rundb_open(&db, path, 0, &err) == 0, "reopen: %s", err.msg);
    if (db) {
        CHECK(cell_long(db, "SELECT count(*) FROM runs") == 2 && cell_long(db, "PRAGMA user_version") == 1, "reopened");
        rundb_close(db);
    }
    /* read-only: reads work, writes fail with sqlite's readonly message */
    CHECK(rundb_open(&db, path, 1, &err) == 0, "open read-only: %s", err.msg);
    if (db) {
        CHECK(cell_long(db, "SELECT count(*) FROM metrics") == 6, "read-only query");
        err.msg[0] = 0;
        CHECK(rundb_query(db, "INSERT INTO experiments (name, created) VALUES ('x', 'now')", NULL, NULL, &err) ==
                  ML_EINPUT && strstr(err.msg, "attempt to write a readonly database") && strstr(err.msg, path),
              "read-only INSERT: %s", err.msg);
        CHECK(rundb_query(db, "DELETE FROM metrics", NULL, NULL, &err) != 0, "read-only DELETE");
        CHECK(rundb_set_status(db, "r1", "killed", NULL, &err) != 0, "read-only set_status: %s", err.msg);
        CHECK(cell_long(db, "SELECT count(*) FROM metrics") == 6 && cell_long(db, "SELECT count(*) FROM experiments") == 1,
              "read-only changed nothing");
        rundb_close(db);
    }
    free(text);
    free(other_text);
}

/* ---- concurrency: NPROC processes write one new file at once ---- */
enum { NPROC = 4, RUNS_PER_PROC = 25, STEPS = 40, KEYS_PER_STEP = 5 }; /* 40 x 5 = 200 metric rows per run */

static int child_failures;
#define CHILD_CHECK(cond, ...)                                                                                 \
    do {                                                                                                       \
        if (!(cond)) {                                                                                         \
            child_failures++;                                                                                  \
            fprintf(stderr, "FAIL child %d %s:%d: ", (int)getpid(), __FILE__, __LINE__);                       \
            fprintf(stderr, __VA_ARGS__);                                                                      \
            fprintf(stderr, "\n");                                                                             \
        }                                                                                                      \
    } while (0)

static int worker(const char *path, int w, int start_fd) {
    char c;
    while (read(start_fd, &c, 1) < 0 && errno == EINTR) {
    } /* returns 0 (EOF) when the parent releases everyone at once */
    close(start_fd);
    ml_rundb *db;
    ml_err err = {0};
    if (rundb_open(&db, path, 0, &err)) {
        fprintf(stderr, "FAIL child %d: open: %s\n", w, err.msg);
        return 1;
    }
    CHILD_CHECK(rundb_add_experiment(db, "conc", "concurrency test", NULL, &err) == 0, "experiment: %s", err.msg);
    const char *keys[KEYS_PER_STEP] = {"loss", "aux_loss", "maxvio", "lr", "grad_norm"};
    ml_config cfg;
    config_preset(&cfg, "tiny", NULL);
    for (int r = 0; r < RUNS_PER_PROC; r++) {
        char id[32];
        snprintf(id, sizeof id, "w%d-r%02d", w, r);
        cfg.seed = (uint64_t)(1000 * w + r);
        char *text = config_text_of(&cfg);
        CHILD_CHECK(rundb_add_run(db, id, "conc", id, &cfg, text, NULL, NULL, "cpu", 1, &err) == 0, "add %s: %s", id,
                    err.msg);
        free(text);
        CHILD_CHECK(rundb_set_status(db, id, "running", NULL, &err) == 0, "running %s: %s", id, err.msg);
        for (int step = 0; step < STEPS; step++) {
            double values[KEYS_PER_STEP];
            for (int k = 0; k < KEYS_PER_STEP; k++) values[k] = w + 0.01 * r + 1e-4 * step + 1e-6 * k;
            CHILD_CHECK(rundb_log_metrics(db, id, 10 * step, KEYS_PER_STEP, keys, values, &err) == 0,
                        "metrics %s step %d: %s", id, step, err.msg);
            if (step % 10 == 9) CHILD_CHECK(rundb_heartbeat(db, id, &err) == 0, "heartbeat %s: %s", id, err.msg);
        }
        int reaped = rundb_reap(db, 3600, &err);
        CHILD_CHECK(reaped == 0, "reap among live workers gave %d: %s", reaped, reaped < 0 ? err.msg : "");
        CHILD_CHECK(rundb_set_summary(db, id, "val_loss", w + 0.01 * r, &err) == 0, "summary %s: %s", id, err.msg);
        CHILD_CHECK(rundb_set_status(db, id, r % 5 == 4 ? "failed" : "finished", r % 5 == 4 ? "test failure" : NULL,
                                     &err) == 0, "final status %s: %s", id, err.msg);
        if (strstr(err.msg, "locked") || strstr(err.msg, "busy")) child_failures++;
    }
    rundb_close(db);
    return child_failures;
}

static void test_concurrency(void) {
    char path[600];
    path_in_tmp(path, sizeof path, "concurrent.db");
    int start[2];
    if (pipe(start)) {
        CHECK(0, "pipe: %s", strerror(errno));
        return;
    }
    fflush(stdout), fflush(stderr);
    pid_t pids[NPROC];
    for (int w = 0; w < NPROC; w++) {
        pids[w] = fork();
        if (pids[w] == 0) {
            close(start[1]);
            int f = worker(path, w, start[0]);
            fflush(stderr);
            _exit(f > 100 ? 100 : f);
        }
    }
    close(start[0]);
    close(start[1]); /* go */

    /* read while they write (a second connection in this process, opened when the file may not exist yet) */
    ml_rundb *db = NULL;
    ml_err err = {0};
    CHECK(rundb_open(&db, path, 0, &err) == 0, "parent open during the writes: %s", err.msg);
    int reads = 0, read_errors = 0, running = NPROC, ok = 0;
    while (running > 0) {
        if (db) {
            const char *n = cell(db, "SELECT count(*) FROM metrics");
            reads++;
            if (!strncmp(n, "ERROR", 5)) {
                if (read_errors++ == 0) printf("  concurrent read: %s\n", n);
            }
        }
        int status;
        pid_t p = waitpid(-1, &status, db ? WNOHANG : 0);
        if (p > 0) {
            running--;
            if (WIFEXITED(status) && WEXITSTATUS(status) == 0) ok++;
            else printf("  worker %d: %s %d\n", (int)p, WIFEXITED(status) ? "exit" : "signal",
                        WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        } else if (p == 0) {
            usleep(2000);
        }
    }
    CHECK(ok == NPROC, "%d of %d workers finished without an error", ok, NPROC);
    CHECK(read_errors == 0, "%d of %d concurrent reads failed", read_errors, reads);
    if (!db && rundb_open(&db, path, 0, &err)) return;
    CHECK(cell_long(db, "SELECT count(*) FROM runs") == NPROC * RUNS_PER_PROC, "runs: %s",
          cell(db, "SELECT count(*) FROM runs"));
    CHECK(cell_long(db, "SELECT count(*) FROM metrics") == NPROC * RUNS_PER_PROC * STEPS * KEYS_PER_STEP,
          "metrics rows: %s", cell(db, "SELECT count(*) FROM metrics"));
    CHECK(cell_long(db, "SELECT count(*) FROM summary") == NPROC * RUNS_PER_PROC, "summary rows");
    CHECK(cell_long(db, "SELECT count(*) FROM experiments") == 1, "one experiment");
    CHECK(cell_long(db, "SELECT count(*) FROM runs WHERE status = 'finished'") == NPROC * 20 &&
              cell_long(db, "SELECT count(*) FROM runs WHERE status = 'failed'") == NPROC * 5, "final statuses");
    CHECK(cell_long(db, "SELECT count(DISTINCT pid) FROM runs") == NPROC, "each worker's pid recorded");
    CHECK(cell_long(db, "SELECT count(*) FROM (SELECT run FROM metrics GROUP BY run HAVING count(*) = 200)") ==
              NPROC * RUNS_PER_PROC, "200 metric rows in every run");
    static key_list keys;
    keys.n = 0;
    ml_config cfg;
    config_preset(&cfg, "tiny", NULL);
    config_foreach(&cfg, collect, &keys);
    CHECK(cell_long(db, "SELECT count(*) FROM params") == (long)NPROC * RUNS_PER_PROC * keys.n, "params rows");
    CHECK(cell_long(db, "PRAGMA user_version") == 1, "schema created once");
    rundb_close(db);
}

/* ---- many processes create one new file at once (the schema must appear once, and none may see a
 * half-made database as a foreign one) ---- */
static void test_open_race(void) {
    enum { REPEATS = 10, OPENERS = 8 };
    int ok = 0;
    for (int rep = 0; rep < REPEATS; rep++) {
        char path[600], name[32];
        snprintf(name, sizeof name, "race%d.db", rep);
        path_in_tmp(path, sizeof path, name);
        int start[2];
        if (pipe(start)) break;
        fflush(stdout), fflush(stderr);
        for (int i = 0; i < OPENERS; i++) {
            if (fork() == 0) {
                close(start[1]);
                char c;
                while (read(start[0], &c, 1) < 0 && errno == EINTR) {
                }
                ml_rundb *db;
                ml_err err = {0};
                int rc = rundb_open(&db, path, 0, &err);
                if (rc) fprintf(stderr, "FAIL opener %d: %s\n", i, err.msg);
                else rundb_close(db);
                _exit(rc ? 1 : 0);
            }
        }
        close(start[0]);
        close(start[1]);
        int status;
        for (int i = 0; i < OPENERS; i++)
            if (wait(&status) > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0) ok++;
    }
    CHECK(ok == REPEATS * OPENERS, "%d of %d simultaneous opens of a new file succeeded", ok, REPEATS * OPENERS);
}

/* ---- a writer that finds the write lock held waits for it (busy timeout) instead of failing ---- */
static void test_lock_wait(void) {
    char path[600];
    path_in_tmp(path, sizeof path, "locked.db");
    ml_rundb *db;
    ml_err err = {0};
    if (rundb_open(&db, path, 0, &err) || rundb_add_run(db, "r", NULL, NULL, NULL, "x", NULL, NULL, NULL, 1, &err)) {
        CHECK(0, "setup: %s", err.msg);
        return;
    }
    int held[2];
    if (pipe(held)) return;
    fflush(stdout), fflush(stderr);
    pid_t child = fork();
    if (child == 0) { /* holds the write lock for 0.5 s */
        sqlite3 *s;
        int rc = sqlite3_open(path, &s) || sqlite3_exec(s, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        if (write(held[1], "x", 1) != 1) rc = 1;
        usleep(500000);
        rc |= sqlite3_exec(s, "COMMIT", NULL, NULL, NULL);
        sqlite3_close(s);
        _exit(rc ? 1 : 0);
    }
    char c;
    CHECK(read(held[0], &c, 1) == 1, "child took the lock");
    const char *key = "loss";
    double v = 1.0;
    CHECK(rundb_log_metrics(db, "r", 1, 1, &key, &v, &err) == 0, "write waited for the lock: %s", err.msg);
    int status;
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "lock holder ran");
    CHECK(cell_long(db, "SELECT count(*) FROM metrics") == 1, "metric written after the wait");
    close(held[0]), close(held[1]);
    rundb_close(db);
}

/* ---- reaping ---- */
static void test_reap(void) {
    char path[600];
    path_in_tmp(path, sizeof path, "reap.db");
    ml_rundb *db;
    ml_err err = {0};
    if (rundb_open(&db, path, 0, &err)) {
        CHECK(0, "open: %s", err.msg);
        return;
    }
    const char *ids[] = {"dead", "stale", "live", "remote"};
    for (int i = 0; i < 4; i++)
        CHECK(rundb_add_run(db, ids[i], NULL, NULL, NULL, ids[i], NULL, NULL, "cpu", 1, &err) == 0, "add %s: %s",
              ids[i], err.msg);

    fflush(stdout);
    pid_t child = fork();
    if (child == 0) { /* claims the run, then dies without a word */
        ml_rundb *cdb;
        ml_err cerr;
        if (rundb_open(&cdb, path, 0, &cerr) || rundb_set_status(cdb, "dead", "running", NULL, &cerr)) _exit(3);
        raise(SIGKILL);
        _exit(4);
    }
    int status;
    waitpid(child, &status, 0); /* a zombie would still answer kill(pid, 0) */
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "child killed (status %d)", status);
    char sql[512];
    snprintf(sql, sizeof sql, "SELECT status || ' ' || pid FROM runs WHERE id = 'dead'");
    char want[512];
    snprintf(want, sizeof want, "running %ld", (long)child);
    CHECK(!strcmp(cell(db, sql), want), "child left its run running: %s", cell(db, sql));

    CHECK(rundb_set_status(db, "stale", "running", NULL, &err) == 0 && rundb_set_status(db, "live", "running", NULL, &err) == 0
              && rundb_set_status(db, "remote", "running", NULL, &err) == 0, "running: %s", err.msg);
    CHECK(rundb_query(db, "UPDATE runs SET heartbeat = '2000-01-01T00:00:00.000Z' WHERE id = 'stale'", NULL, NULL,
                      &err) == 0, "age the heartbeat: %s", err.msg);
    /* another machine's run: its pid means nothing here (999999 is above the default pid_max) */
    CHECK(rundb_query(db, "UPDATE runs SET host = 'elsewhere.example', pid = 999999 WHERE id = 'remote'", NULL, NULL,
                      &err) == 0, "move the run: %s", err.msg);

    int n = rundb_reap(db, 0, &err); /* heartbeat rule off: only the dead process */
    CHECK(n == 1, "reap(0) marked %d: %s", n, n < 0 ? err.msg : "");
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    snprintf(want, sizeof want, "killed|process died (pid %ld on %s)|1", (long)child, host);
    const char *got = cell(db, "SELECT status || '|' || error || '|' || (finished IS NOT NULL) FROM runs WHERE id = 'dead'");
    CHECK(!strcmp(got, want), "dead run: '%s', want '%s'", got, want);

    n = rundb_reap(db, 60, &err);
    CHECK(n == 1, "reap(60) marked %d: %s", n, n < 0 ? err.msg : "");
    got = cell(db, "SELECT status || '|' || error FROM runs WHERE id = 'stale'");
    CHECK(!strncmp(got, "killed|no heartbeat for ", 24) && strstr(got, " s (pid "), "stale run: %s", got);
    CHECK(rundb_reap(db, 60, &err) == 0, "nothing left to reap");
    CHECK(!strcmp(cell(db, "SELECT group_concat(id) FROM runs WHERE status = 'running' ORDER BY id"), "live,remote") ||
              !strcmp(cell(db, "SELECT group_concat(id) FROM runs WHERE status = 'running' ORDER BY id"), "remote,live"),
          "live and remote runs untouched: %s", cell(db, "SELECT group_concat(id) FROM runs WHERE status = 'running'"));
    rundb_close(db);
}

/* ---- files rundb_open refuses ---- */
static void write_file(const char *path, const char *text, int repeat) {
    FILE *f = fopen(path, "w");
    for (int i = 0; f && i < repeat; i++) fputs(text, f);
    if (f) fclose(f);
}

static void expect_refused(const char *path, int readonly, const char *want1, const char *want2) {
    ml_rundb *db = (ml_rundb *)1;
    ml_err err = {0};
    int rc = rundb_open(&db, path, readonly, &err);
    CHECK(rc == ML_EINPUT && db == NULL && strstr(err.msg, path) && strstr(err.msg, want1) &&
              (!want2 || strstr(err.msg, want2)),
          "open%s %s: rc %d '%s', want '%s'", readonly ? " read-only" : "", path, rc, err.msg, want1);
    if (rc == 0) rundb_close(db);
}

static void test_bad_files(void) {
    char path[600], probe[700], got[64];
    struct stat st;

    path_in_tmp(path, sizeof path, "notes.txt");
    write_file(path, "These are notes, not a database. ", 40);
    expect_refused(path, 0, "not a SQLite database", NULL);
    expect_refused(path, 1, "not a SQLite database", NULL);
    CHECK(stat(path, &st) == 0 && st.st_size == 33 * 40, "text file unchanged (%ld bytes)", (long)st.st_size);
    snprintf(probe, sizeof probe, "%s-wal", path);
    CHECK(access(probe, F_OK) != 0, "no WAL file next to the text file");
    path_in_tmp(path, sizeof path, "short.txt");
    write_file(path, "hello\n", 1);
    expect_refused(path, 0, "not a SQLite database", NULL);

    path_in_tmp(path, sizeof path, "foreign.db");
    raw_exec(path, "CREATE TABLE people (name TEXT); CREATE TABLE pets (name TEXT, owner TEXT)");
    expect_refused(path, 0, "not a moelab run database (has tables people, pets)", NULL);
    expect_refused(path, 1, "not a moelab run database (has tables people, pets)", NULL);
    raw_cell(path, "PRAGMA journal_mode", got, sizeof got);
    CHECK(!strcmp(got, "delete"), "foreign database left in journal mode %s", got);
    raw_cell(path, "SELECT count(*) FROM sqlite_master", got, sizeof got);
    CHECK(!strcmp(got, "2"), "foreign database gained no tables (%s)", got);

    path_in_tmp(path, sizeof path, "versioned.db"); /* another program that also uses user_version */
    raw_exec(path, "CREATE TABLE runs (x); PRAGMA user_version = 1");
    expect_refused(path, 0, "not a moelab run database (has tables runs)", NULL);

    path_in_tmp(path, sizeof path, "future.db");
    ml_rundb *db;
    ml_err err = {0};
    CHECK(rundb_open(&db, path, 0, &err) == 0, "create: %s", err.msg);
    rundb_close(db);
    raw_exec(path, "PRAGMA user_version = 99");
    expect_refused(path, 0, "schema version 99 is newer", "(version 1)");
    expect_refused(path, 1, "schema version 99 is newer", "(version 1)");
    raw_cell(path, "PRAGMA user_version", got, sizeof got);
    CHECK(!strcmp(got, "99"), "newer database left alone (%s)", got);

    path_in_tmp(path, sizeof path, "shell.db"); /* made with the sqlite3 shell: our tables, no application_id */
    raw_exec(path, "CREATE TABLE experiments (name); CREATE TABLE runs (id); CREATE TABLE params (run);"
                   "CREATE TABLE metrics (run); CREATE TABLE summary (run); PRAGMA user_version = 7");
    expect_refused(path, 0, "schema version 7 is newer", NULL);

    path_in_tmp(path, sizeof path, "missing.db");
    expect_refused(path, 1, "cannot open", NULL);
    path_in_tmp(path, sizeof path, "no/such/dir/runs.db");
    expect_refused(path, 0, "cannot open", NULL);

    path_in_tmp(path, sizeof path, "empty.db");
    write_file(path, "", 1);
    expect_refused(path, 1, "empty database", NULL);
    CHECK(rundb_open(&db, path, 0, &err) == 0, "an empty file becomes a run database: %s", err.msg);
    if (db) {
        CHECK(cell_long(db, "SELECT count(*) FROM runs") == 0, "empty file has the schema");
        rundb_close(db);
    }
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/test_rundb.XXXXXX", base && base[0] ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        printf("mkdtemp %s: %s\n", tmpdir, strerror(errno));
        return 1;
    }
    test_hash();
    test_round_trip();
    test_open_race();
    test_concurrency();
    test_lock_wait();
    test_reap();
    test_bad_files();
    if (!failed) nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    else printf("files kept in %s\n", tmpdir);
    printf("rundb: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
