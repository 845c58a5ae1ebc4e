/* rundb.c: the run database on SQLite (see rundb.h and docs/rundb.md): opening with schema creation and
 * migration, and short write transactions that several processes can run at once on one file. It stores
 * and queries rows; deciding which runs to start or how to print a result is left to its callers. */
#include "rundb.h"

#include <errno.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* "MoEL": PRAGMA application_id marks the file as a moelab run database (file(1) and sqlite3 show it). */
#define ML_RUNDB_APP_ID 0x4d6f454c
/* How long sqlite waits on a lock before returning SQLITE_BUSY, and how long we keep retrying after that.
 * Transactions here last milliseconds, so either limit is only reached when a process hangs holding the
 * write lock (or the file is on a filesystem without working locks). */
#define BUSY_TIMEOUT_MS 10000
#define RETRY_SECONDS 60.0
/* ISO-8601 UTC with milliseconds, e.g. 2024-05-01T12:34:56.789Z; julianday() parses it back. */
#define NOW_SQL "strftime('%Y-%m-%dT%H:%M:%fZ','now')"

struct ml_rundb {
    sqlite3 *db;
    int readonly;
    int last_rc; /* the sqlite code of the last failure, for callers that map particular codes */
    char path[1024];
    char host[256];
};

/* Schema scripts: migrations[v] takes a database from version v to v+1 (migrations[0] creates it). Each runs
 * inside the BEGIN IMMEDIATE transaction that also sets user_version, so a migration is all or nothing and
 * processes opening the file at once apply it exactly once. Version 2 is one more entry here. */
static const char *const migrations[] = {
    /* 0 -> 1 */
    "CREATE TABLE experiments (\n"
    "  name TEXT PRIMARY KEY NOT NULL,\n"
    "  description TEXT,\n"
    "  file TEXT,\n"
    "  created TEXT NOT NULL\n"
    ");\n"
    "CREATE TABLE runs (\n"
    "  id TEXT PRIMARY KEY NOT NULL,\n"
    "  experiment TEXT REFERENCES experiments(name),\n"
    "  name TEXT,\n"
    "  status TEXT NOT NULL DEFAULT 'queued'\n"
    "    CHECK (status IN ('queued', 'running', 'finished', 'failed', 'killed')),\n"
    "  config TEXT,\n"
    "  config_hash TEXT,\n"
    "  created TEXT NOT NULL,\n"
    "  started TEXT,\n"
    "  finished TEXT,\n"
    "  host TEXT,\n"
    "  pid INTEGER,\n"
    "  heartbeat TEXT,\n"
    "  backend TEXT,\n"
    "  world_size INTEGER,\n"
    "  run_dir TEXT,\n"
    "  trace_path TEXT,\n"
    "  error TEXT\n"
    ");\n"
    "CREATE INDEX runs_experiment ON runs(experiment);\n"
    "CREATE INDEX runs_status ON runs(status);\n"
    "CREATE TABLE params (\n"
    "  run TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  key TEXT NOT NULL,\n"
    "  value TEXT,\n"
    "  PRIMARY KEY (run, key)\n"
    ");\n"
    "CREATE INDEX params_key_value ON params(key, value);\n"
    "CREATE TABLE metrics (\n"
    "  run TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  step INTEGER NOT NULL,\n"
    "  key TEXT NOT NULL,\n"
    "  value REAL,\n"
    "  PRIMARY KEY (run, step, key)\n"
    ");\n"
    "CREATE INDEX metrics_run_key ON metrics(run, key, step);\n"
    "CREATE TABLE summary (\n"
    "  run TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,\n"
    "  key TEXT NOT NULL,\n"
    "  value REAL,\n"
    "  PRIMARY KEY (run, key)\n"
    ");\n",
};
_Static_assert(sizeof migrations / sizeof migrations[0] == ML_RUNDB_SCHEMA,
               "one migration script per schema version");

/* The tables of the current schema: a file with all of them (and a user_version) is ours even without our
 * application_id, e.g. one created with the sqlite3 shell from docs/rundb.md. */
static const char *const moelab_tables[] = {"experiments", "metrics", "params", "runs", "summary"};

static const char *const status_names[] = {"queued", "running", "finished", "failed", "killed", NULL};

static double monotonic_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int is_busy(int rc) { return (rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED; }

/* Sleeps 1-16 ms, varied by pid and attempt so that processes that collided do not retry in lockstep. */
static void backoff(int attempt) {
    unsigned jitter = ((unsigned)getpid() * 2654435761u + (unsigned)attempt * 40503u) >> 16;
    struct timespec ts = {0, (long)(1 + jitter % 16) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Lock waits, full disks and I/O errors make a run fail; everything else (bad SQL, constraint, wrong file)
 * is a bad input. */
static int ml_code(int rc) {
    switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_NOMEM:
    case SQLITE_PROTOCOL:
        return ML_ERUN;
    default:
        return ML_EINPUT;
    }
}

/* Writes "PATH: WHAT: sqlite's message" into err (which may be NULL) and returns the ML code for rc. Call it
 * before anything else touches the connection (a ROLLBACK would replace sqlite's message). */
static int fail(ml_rundb *db, ml_err *err, int rc, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(ml_rundb *db, ml_err *err, int rc, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    const char *msg = db->db ? sqlite3_errmsg(db->db) : sqlite3_errstr(rc);
    db->last_rc = rc;
    if (is_busy(rc))
        return ml_errf(err, ml_code(rc), "%.400s: %s: %s (gave up after %.0f s)", db->path, what, msg,
                       RETRY_SECONDS);
    return ml_errf(err, ml_code(rc), "%.400s: %s: %s", db->path, what, msg);
}

/* Runs one statement (rows ignored), retrying while the file is busy: the busy handler covers most waits,
 * but SQLite returns SQLITE_BUSY without calling it in a few cases (another connection switching the file to
 * WAL or recovering the WAL index, a lock upgrade that could deadlock). Not for multi-statement scripts. */
static int exec_retry(ml_rundb *db, const char *sql) {
    const double deadline = monotonic_seconds() + RETRY_SECONDS;
    for (int attempt = 0;; attempt++) {
        int rc = sqlite3_exec(db->db, sql, NULL, NULL, NULL);
        if (!is_busy(rc) || monotonic_seconds() > deadline) return rc;
        backoff(attempt);
    }
}

static int prepare(ml_rundb *db, const char *sql, sqlite3_stmt **st, ml_err *err) {
    const double deadline = monotonic_seconds() + RETRY_SECONDS;
    for (int attempt = 0;; attempt++) {
        int rc = sqlite3_prepare_v2(db->db, sql, -1, st, NULL);
        if (rc == SQLITE_OK) return ML_OK;
        if (!is_busy(rc) || monotonic_seconds() > deadline) return fail(db, err, rc, "preparing \"%.200s\"", sql);
        backoff(attempt);
    }
}

static int begin_write(ml_rundb *db, ml_err *err) {
    int rc = exec_retry(db, "BEGIN IMMEDIATE");
    return rc == SQLITE_OK ? ML_OK : fail(db, err, rc, "BEGIN IMMEDIATE");
}

static int commit(ml_rundb *db, ml_err *err) {
    int rc = exec_retry(db, "COMMIT"); /* BUSY leaves the transaction open, so retrying is safe */
    return rc == SQLITE_OK ? ML_OK : fail(db, err, rc, "COMMIT");
}

static void rollback(ml_rundb *db) {
    if (!sqlite3_get_autocommit(db->db)) sqlite3_exec(db->db, "ROLLBACK", NULL, NULL, NULL);
}

/* Commits when rc is ML_OK, rolls back otherwise; returns the first error. */
static int end_write(ml_rundb *db, int rc, ml_err *err) {
    if (rc == ML_OK) rc = commit(db, err);
    if (rc != ML_OK) rollback(db);
    return rc;
}

static int pragma_int(ml_rundb *db, const char *sql, int *out, ml_err *err) {
    sqlite3_stmt *st;
    int rc = prepare(db, sql, &st, err);
    if (rc) return rc;
    const double deadline = monotonic_seconds() + RETRY_SECONDS;
    for (int attempt = 0;; attempt++) {
        int s = sqlite3_step(st);
        if (s == SQLITE_ROW) {
            *out = sqlite3_column_int(st, 0);
            break;
        }
        if (!is_busy(s) || monotonic_seconds() > deadline) {
            rc = fail(db, err, s, "%s", sql);
            break;
        }
        sqlite3_reset(st);
        backoff(attempt);
    }
    sqlite3_finalize(st);
    return rc;
}

/* What the file holds: its version stamps and its table names (", "-joined, sorted). */
typedef struct {
    int user_version, app_id;
    int ntables, has_moelab_tables;
    char tables[512];
} db_identity;

static int identify_in_snapshot(ml_rundb *db, db_identity *id, ml_err *err) {
    memset(id, 0, sizeof *id);
    int rc = pragma_int(db, "PRAGMA user_version", &id->user_version, err);
    if (!rc) rc = pragma_int(db, "PRAGMA application_id", &id->app_id, err);
    if (rc) return rc;
    sqlite3_stmt *st;
    rc = prepare(db, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
                     "ORDER BY name", &st, err);
    if (rc) return rc;
    int found = 0, s;
    size_t len = 0;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        for (size_t i = 0; i < sizeof moelab_tables / sizeof *moelab_tables; i++)
            found += !strcmp(name, moelab_tables[i]);
        if (len + strlen(name) + 8 < sizeof id->tables)
            len += (size_t)snprintf(id->tables + len, sizeof id->tables - len, "%s%s", id->ntables ? ", " : "", name);
        else if (len + 5 < sizeof id->tables && !strstr(id->tables, ", ..."))
            len += (size_t)snprintf(id->tables + len, sizeof id->tables - len, ", ...");
        id->ntables++;
    }
    if (s != SQLITE_DONE) rc = fail(db, err, s, "listing tables");
    sqlite3_finalize(st);
    id->has_moelab_tables = found == (int)(sizeof moelab_tables / sizeof *moelab_tables);
    return rc;
}

/* Reads the identity in one read transaction (unless the caller holds one): read one by one, the stamps and
 * the table list could straddle another process's schema creation and look like a foreign database. */
static int identify(ml_rundb *db, db_identity *id, ml_err *err) {
    if (!sqlite3_get_autocommit(db->db)) return identify_in_snapshot(db, id, err);
    int s = exec_retry(db, "BEGIN");
    if (s != SQLITE_OK) return fail(db, err, s, "BEGIN");
    int rc = identify_in_snapshot(db, id, err);
    rollback(db);
    return rc;
}

static int is_empty(const db_identity *id) { return id->ntables == 0 && id->user_version == 0 && id->app_id == 0; }

/* ML_OK when the file is empty or a moelab database this code can read; ML_EINPUT naming the file otherwise. */
static int check_identity(const ml_rundb *db, const db_identity *id, ml_err *err) {
    if (is_empty(id)) {
        if (db->readonly) return ml_errf(err, ML_EINPUT, "%s: empty database, not a moelab run database", db->path);
        return ML_OK;
    }
    const int ours = id->app_id == ML_RUNDB_APP_ID || (id->app_id == 0 && id->user_version > 0 && id->has_moelab_tables);
    if (!ours) {
        if (id->ntables)
            return ml_errf(err, ML_EINPUT, "%s: not a moelab run database (has tables %s)", db->path, id->tables);
        return ml_errf(err, ML_EINPUT, "%s: not a moelab run database (no tables; application_id %d, user_version %d)",
                       db->path, id->app_id, id->user_version);
    }
    if (id->user_version > ML_RUNDB_SCHEMA)
        return ml_errf(err, ML_EINPUT,
                       "%s: run database schema version %d is newer than this moelab's (version %d); use a newer "
                       "moelab", db->path, id->user_version, ML_RUNDB_SCHEMA);
    return ML_OK;
}

/* Creates or migrates the schema to ML_RUNDB_SCHEMA. Identity is checked again under the write lock: another
 * process may have created the tables since we looked. */
static int migrate(ml_rundb *db, ml_err *err) {
    int rc = begin_write(db, err);
    if (rc) return rc;
    db_identity id;
    rc = identify(db, &id, err);
    if (!rc) rc = check_identity(db, &id, err);
    for (int v = id.user_version; !rc && v < ML_RUNDB_SCHEMA; v++) {
        int s = sqlite3_exec(db->db, migrations[v], NULL, NULL, NULL);
        if (s != SQLITE_OK) rc = fail(db, err, s, "migrating the schema from version %d to %d", v, v + 1);
    }
    if (!rc && id.user_version < ML_RUNDB_SCHEMA) {
        char sql[128];
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d; PRAGMA application_id = %d", ML_RUNDB_SCHEMA,
                 ML_RUNDB_APP_ID);
        int s = sqlite3_exec(db->db, sql, NULL, NULL, NULL);
        if (s != SQLITE_OK) rc = fail(db, err, s, "setting the schema version");
    }
    return end_write(db, rc, err);
}

static int set_pragma(ml_rundb *db, const char *sql, ml_err *err) {
    int rc = exec_retry(db, sql);
    return rc == SQLITE_OK ? ML_OK : fail(db, err, rc, "%s", sql);
}

int rundb_open(ml_rundb **out, const char *path, int readonly, ml_err *err) {
    *out = NULL;
    ml_rundb *db = calloc(1, sizeof *db);
    if (!db) return ml_errf(err, ML_ERUN, "%s: out of memory", path);
    snprintf(db->path, sizeof db->path, "%s", path);
    db->readonly = readonly;
    if (gethostname(db->host, sizeof db->host - 1)) snprintf(db->host, sizeof db->host, "unknown");
    db->host[sizeof db->host - 1] = 0;

    int flags = readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
    int s = sqlite3_open_v2(path, &db->db, flags, NULL);
    int rc = ML_OK;
    if (s != SQLITE_OK) {
        rc = ml_errf(err, ML_EINPUT, "%s: cannot open the run database: %s", path,
                     db->db ? sqlite3_errmsg(db->db) : sqlite3_errstr(s));
    } else {
        sqlite3_extended_result_codes(db->db, 1);
        sqlite3_busy_timeout(db->db, BUSY_TIMEOUT_MS);
        db_identity id;
        /* Look before changing anything: a foreign database must not be switched to WAL. */
        rc = identify(db, &id, err);
        if (rc && (db->last_rc & 0xff) == SQLITE_NOTADB)
            rc = ml_errf(err, ML_EINPUT, "%s: not a SQLite database", path);
        if (!rc) rc = check_identity(db, &id, err);
        if (!rc) rc = set_pragma(db, "PRAGMA foreign_keys = ON", err);
        if (!rc && readonly) {
            rc = set_pragma(db, "PRAGMA query_only = 1", err);
        } else if (!rc) {
            /* WAL lets readers run during writes and makes each commit one append; NORMAL syncs at checkpoints
             * only, which in WAL mode can lose the last commits on power loss but never corrupts the file. */
            rc = set_pragma(db, "PRAGMA journal_mode = WAL", err);
            if (!rc) rc = set_pragma(db, "PRAGMA synchronous = NORMAL", err);
            if (!rc && id.user_version < ML_RUNDB_SCHEMA) rc = migrate(db, err);
        }
    }
    if (rc) {
        rundb_close(db);
        return rc;
    }
    *out = db;
    return ML_OK;
}

void rundb_close(ml_rundb *db) {
    if (!db) return;
    sqlite3_close_v2(db->db);
    free(db);
}

/* Binds text, or NULL for a NULL pointer. */
static void bind_text(sqlite3_stmt *st, int i, const char *text) {
    if (text) sqlite3_bind_text(st, i, text, -1, SQLITE_TRANSIENT);
    else sqlite3_bind_null(st, i);
}

/* Steps a statement that returns no rows; SQLITE_OK or sqlite's error. */
static int step_done(sqlite3_stmt *st) {
    int s = sqlite3_step(st);
    return s == SQLITE_DONE ? SQLITE_OK : s;
}

static int run_exists(ml_rundb *db, const char *id, int *exists, ml_err *err) {
    sqlite3_stmt *st;
    int rc = prepare(db, "SELECT 1 FROM runs WHERE id = ?", &st, err);
    if (rc) return rc;
    bind_text(st, 1, id);
    int s = sqlite3_step(st);
    *exists = s == SQLITE_ROW;
    if (s != SQLITE_ROW && s != SQLITE_DONE) rc = fail(db, err, s, "run %s", id);
    sqlite3_finalize(st);
    return rc;
}

int rundb_add_experiment(ml_rundb *db, const char *name, const char *description, const char *file, ml_err *err) {
    if (!name || !name[0]) return ML_OK;
    int rc = begin_write(db, err);
    if (rc) return rc;
    sqlite3_stmt *st;
    rc = prepare(db, "INSERT OR IGNORE INTO experiments (name, description, file, created) VALUES (?, ?, ?, " NOW_SQL ")",
                 &st, err);
    if (!rc) {
        bind_text(st, 1, name), bind_text(st, 2, description), bind_text(st, 3, file);
        int s = step_done(st);
        if (s) rc = fail(db, err, s, "adding experiment %s", name);
        sqlite3_finalize(st);
    }
    return end_write(db, rc, err);
}

typedef struct {
    sqlite3_stmt *st;
    int status; /* first sqlite error */
    FILE *flat; /* "key=value\n" lines, for the hash when there is no config text */
} params_ctx;

static void insert_param(const char *key, const char *value, void *vctx) {
    params_ctx *p = vctx;
    if (p->flat) fprintf(p->flat, "%s=%s\n", key, value);
    if (!p->st || p->status != SQLITE_OK) return;
    sqlite3_reset(p->st);
    sqlite3_bind_text(p->st, 2, key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(p->st, 3, value, -1, SQLITE_TRANSIENT);
    p->status = step_done(p->st);
}

/* The hash that identifies a run's config: the caller's, else that of the config text, else that of the
 * flattened keys. */
static void resolve_hash(const ml_config *cfg, const char *config_text, const char *config_hash, char out[17]) {
    if (config_hash) {
        snprintf(out, 17, "%s", config_hash);
    } else if (config_text || !cfg) {
        rundb_config_hash(config_text ? config_text : "", out);
    } else {
        char *flat = NULL;
        size_t len = 0;
        params_ctx p = {.flat = open_memstream(&flat, &len)};
        if (p.flat) {
            config_foreach(cfg, insert_param, &p);
            fclose(p.flat);
        }
        rundb_config_hash(flat ? flat : "", out);
        free(flat);
    }
}

int rundb_add_run(ml_rundb *db, const char *id, const char *experiment, const char *name, const ml_config *cfg,
                  const char *config_text, const char *config_hash, const char *run_dir, const char *backend,
                  int world_size, ml_err *err) {
    if (!id || !id[0]) return ml_errf(err, ML_EINPUT, "%s: a run needs a non-empty id", db->path);
    if (experiment && !experiment[0]) experiment = NULL;
    char hash[17];
    resolve_hash(cfg, config_text, config_hash, hash);

    int rc = begin_write(db, err);
    if (rc) return rc;
    sqlite3_stmt *st;
    rc = prepare(db, "SELECT config_hash FROM runs WHERE id = ?", &st, err);
    if (rc) return end_write(db, rc, err);
    bind_text(st, 1, id);
    int s = sqlite3_step(st), exists = s == SQLITE_ROW;
    if (exists) {
        const char *old = (const char *)sqlite3_column_text(st, 0);
        if (!old || strcmp(old, hash))
            rc = ml_errf(err, ML_EINPUT, "%s: run ID %s exists with another config (hash %s, this one %s)", db->path, id,
                         old ? old : "none", hash);
    } else if (s != SQLITE_DONE) {
        rc = fail(db, err, s, "run %s", id);
    }
    sqlite3_finalize(st);
    if (rc || exists) return end_write(db, rc, err);

    if (experiment) {
        rc = prepare(db, "SELECT 1 FROM experiments WHERE name = ?", &st, err);
        if (rc) return end_write(db, rc, err);
        bind_text(st, 1, experiment);
        s = sqlite3_step(st);
        if (s == SQLITE_DONE)
            rc = ml_errf(err, ML_EINPUT, "%s: run %s: unknown experiment '%s' (add the experiment first)", db->path,
                         id, experiment);
        else if (s != SQLITE_ROW)
            rc = fail(db, err, s, "run %s: experiment %s", id, experiment);
        sqlite3_finalize(st);
        if (rc) return end_write(db, rc, err);
    }

    rc = prepare(db,
                 "INSERT INTO runs (id, experiment, name, status, config, config_hash, created, backend, world_size, "
                 "run_dir) VALUES (?, ?, ?, 'queued', ?, ?, " NOW_SQL ", ?, ?, ?)", &st, err);
    if (rc) return end_write(db, rc, err);
    bind_text(st, 1, id), bind_text(st, 2, experiment), bind_text(st, 3, name), bind_text(st, 4, config_text);
    bind_text(st, 5, hash), bind_text(st, 6, backend), sqlite3_bind_int(st, 7, world_size), bind_text(st, 8, run_dir);
    s = step_done(st);
    if (s) rc = fail(db, err, s, "adding run %s", id);
    sqlite3_finalize(st);

    if (!rc && cfg) {
        params_ctx p = {0};
        rc = prepare(db, "INSERT INTO params (run, key, value) VALUES (?, ?, ?)", &p.st, err);
        if (!rc) {
            sqlite3_bind_text(p.st, 1, id, -1, SQLITE_TRANSIENT);
            config_foreach(cfg, insert_param, &p);
            if (p.status) rc = fail(db, err, p.status, "run %s: params", id);
            sqlite3_finalize(p.st);
        }
    }
    return end_write(db, rc, err);
}

/* Runs one UPDATE of a single run (id bound last, as parameter nbind + 1) in its own write transaction; an
 * unknown id is ML_EINPUT. texts[i] binds parameter i + 1. */
static int update_run(ml_rundb *db, const char *id, const char *what, const char *sql, int nbind,
                      const char *const *texts, ml_err *err) {
    int rc = begin_write(db, err);
    if (rc) return rc;
    sqlite3_stmt *st;
    rc = prepare(db, sql, &st, err);
    if (rc) return end_write(db, rc, err);
    for (int i = 0; i < nbind; i++) bind_text(st, i + 1, texts[i]);
    bind_text(st, nbind + 1, id);
    int s = step_done(st);
    if (s) rc = fail(db, err, s, "run %s: %s", id, what);
    else if (sqlite3_changes(db->db) == 0) rc = ml_errf(err, ML_EINPUT, "%s: run %s: no such run", db->path, id);
    sqlite3_finalize(st);
    return end_write(db, rc, err);
}

int rundb_set_status(ml_rundb *db, const char *id, const char *status, const char *error, ml_err *err) {
    int known = 0;
    for (int i = 0; status && status_names[i]; i++) known |= !strcmp(status, status_names[i]);
    if (!known)
        return ml_errf(err, ML_EINPUT, "%s: run %s: unknown status '%s' (queued, running, finished, failed, killed)",
                       db->path, id, status ? status : "(null)");
    char what[64];
    snprintf(what, sizeof what, "status %s", status);
    if (!strcmp(status, "running")) {
        char pid[32];
        snprintf(pid, sizeof pid, "%ld", (long)getpid());
        /* started keeps the first start (a resumed run keeps it); finished and error of an earlier attempt go */
        const char *texts[] = {db->host, pid};
        return update_run(db, id, what,
                          "UPDATE runs SET status = 'running', started = COALESCE(started, " NOW_SQL "), host = ?, "
                          "pid = CAST(? AS INTEGER), heartbeat = " NOW_SQL ", finished = NULL, error = NULL WHERE id = ?",
                          2, texts, err);
    }
    if (!strcmp(status, "queued")) {
        const char *texts[] = {error};
        return update_run(db, id, what,
                          "UPDATE runs SET status = 'queued', finished = NULL, error = ? WHERE id = ?", 1, texts, err);
    }
    const char *texts[] = {status, error};
    return update_run(db, id, what, "UPDATE runs SET status = ?, finished = " NOW_SQL ", error = ? WHERE id = ?", 2,
                      texts, err);
}

int rundb_claim(ml_rundb *db, const char *id, int retry_failed, ml_err *err) {
    char pid[32];
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    int rc = begin_write(db, err);
    if (rc) return rc;
    sqlite3_stmt *st;
    rc = prepare(db,
                 "UPDATE runs SET status = 'running', started = COALESCE(started, " NOW_SQL "), host = ?, "
                 "pid = CAST(? AS INTEGER), heartbeat = " NOW_SQL ", finished = NULL, error = NULL "
                 "WHERE id = ? AND (status IN ('queued', 'killed') OR (? AND status = 'failed'))", &st, err);
    if (rc) return end_write(db, rc, err);
    bind_text(st, 1, db->host), bind_text(st, 2, pid), bind_text(st, 3, id);
    sqlite3_bind_int(st, 4, retry_failed != 0);
    int s = step_done(st), claimed = 0;
    if (s) rc = fail(db, err, s, "run %s: claiming", id);
    else claimed = sqlite3_changes(db->db) == 1;
    sqlite3_finalize(st);
    rc = end_write(db, rc, err);
    return rc ? rc : claimed;
}

int rundb_find_run(ml_rundb *db, const char *experiment, const char *config_hash, ml_run_ref *ref, ml_err *err) {
    sqlite3_stmt *st;
    int rc = prepare(db,
                     "SELECT id, status, run_dir FROM runs WHERE experiment IS ? AND config_hash = ? "
                     "ORDER BY created DESC, rowid DESC LIMIT 1", &st, err);
    if (rc) return rc;
    bind_text(st, 1, experiment && experiment[0] ? experiment : NULL), bind_text(st, 2, config_hash);
    int s = sqlite3_step(st), found = 0;
    if (s == SQLITE_ROW) {
        const char *dir = (const char *)sqlite3_column_text(st, 2);
        snprintf(ref->id, sizeof ref->id, "%s", (const char *)sqlite3_column_text(st, 0));
        snprintf(ref->status, sizeof ref->status, "%s", (const char *)sqlite3_column_text(st, 1));
        snprintf(ref->run_dir, sizeof ref->run_dir, "%s", dir ? dir : "");
        found = 1;
    } else if (s != SQLITE_DONE) {
        rc = fail(db, err, s, "finding a run of experiment %s", experiment ? experiment : "(none)");
    }
    sqlite3_finalize(st);
    return rc ? rc : found;
}

int rundb_heartbeat(ml_rundb *db, const char *id, ml_err *err) {
    return update_run(db, id, "heartbeat", "UPDATE runs SET heartbeat = " NOW_SQL " WHERE id = ?", 0, NULL, err);
}

int rundb_set_trace_path(ml_rundb *db, const char *id, const char *trace_path, ml_err *err) {
    const char *texts[] = {trace_path};
    return update_run(db, id, "trace path", "UPDATE runs SET trace_path = ? WHERE id = ?", 1, texts, err);
}

int rundb_log_metrics(ml_rundb *db, const char *id, int64_t step, int n, const char *const *keys,
                      const double *values, ml_err *err) {
    if (n <= 0) return ML_OK;
    int rc = begin_write(db, err), exists = 0;
    if (rc) return rc;
    rc = run_exists(db, id, &exists, err);
    if (!rc && !exists) rc = ml_errf(err, ML_EINPUT, "%s: run %s: no such run (logging metrics)", db->path, id);
    sqlite3_stmt *st = NULL;
    if (!rc) rc = prepare(db, "INSERT OR REPLACE INTO metrics (run, step, key, value) VALUES (?, ?, ?, ?)", &st, err);
    if (!rc) {
        bind_text(st, 1, id);
        sqlite3_bind_int64(st, 2, step);
        for (int i = 0; i < n && !rc; i++) {
            sqlite3_reset(st);
            bind_text(st, 3, keys[i]);
            sqlite3_bind_double(st, 4, values[i]); /* NaN is stored as NULL (sqlite has no NaN) */
            int s = step_done(st);
            if (s) rc = fail(db, err, s, "run %s: metric %s at step %lld", id, keys[i] ? keys[i] : "(null)",
                             (long long)step);
        }
    }
    sqlite3_finalize(st);
    return end_write(db, rc, err);
}

int rundb_set_summary(ml_rundb *db, const char *id, const char *key, double value, ml_err *err) {
    int rc = begin_write(db, err), exists = 0;
    if (rc) return rc;
    rc = run_exists(db, id, &exists, err);
    if (!rc && !exists) rc = ml_errf(err, ML_EINPUT, "%s: run %s: no such run (summary %s)", db->path, id, key);
    sqlite3_stmt *st = NULL;
    if (!rc) rc = prepare(db, "INSERT OR REPLACE INTO summary (run, key, value) VALUES (?, ?, ?)", &st, err);
    if (!rc) {
        bind_text(st, 1, id), bind_text(st, 2, key);
        sqlite3_bind_double(st, 3, value);
        int s = step_done(st);
        if (s) rc = fail(db, err, s, "run %s: summary %s", id, key ? key : "(null)");
    }
    sqlite3_finalize(st);
    return end_write(db, rc, err);
}

typedef struct {
    char *id;
    char why[384];
} reap_item;

int rundb_reap(ml_rundb *db, int stale_seconds, ml_err *err) {
    int rc = begin_write(db, err);
    if (rc) return rc;
    sqlite3_stmt *st;
    /* age of the last sign of life in seconds; NULL when the timestamp does not parse */
    rc = prepare(db,
                 "SELECT id, host, pid, (julianday('now') - julianday(COALESCE(heartbeat, started, created))) * 86400.0 "
                 "FROM runs WHERE status = 'running'", &st, err);
    if (rc) return end_write(db, rc, err);
    reap_item *items = NULL;
    int n = 0, cap = 0, s;
    while (!rc && (s = sqlite3_step(st)) == SQLITE_ROW) {
        const char *id = (const char *)sqlite3_column_text(st, 0);
        const char *host = (const char *)sqlite3_column_text(st, 1);
        const long pid = sqlite3_column_type(st, 2) == SQLITE_NULL ? 0 : (long)sqlite3_column_int64(st, 2);
        const int has_age = sqlite3_column_type(st, 3) != SQLITE_NULL;
        const double age = sqlite3_column_double(st, 3);
        char why[384] = "";
        /* pid > 0: kill(0) and kill(-1) would signal process groups. EPERM means alive (another user's). */
        if (host && pid > 0 && !strcmp(host, db->host) && kill((pid_t)pid, 0) && errno == ESRCH)
            snprintf(why, sizeof why, "process died (pid %ld on %.200s)", pid, host);
        else if (stale_seconds > 0 && has_age && age > stale_seconds)
            snprintf(why, sizeof why, "no heartbeat for %.0f s (pid %ld on %.200s)", age, pid, host ? host : "?");
        if (!why[0] || !id) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            reap_item *grown = realloc(items, (size_t)cap * sizeof *items);
            if (!grown) {
                rc = ml_errf(err, ML_ERUN, "%s: out of memory reaping runs", db->path);
                break;
            }
            items = grown;
        }
        items[n].id = strdup(id);
        memcpy(items[n].why, why, sizeof why);
        n++;
    }
    if (!rc && s != SQLITE_DONE) rc = fail(db, err, s, "listing running runs");
    sqlite3_finalize(st);

    if (!rc && n) {
        rc = prepare(db,
                     "UPDATE runs SET status = 'killed', finished = " NOW_SQL ", error = ? WHERE id = ? AND "
                     "status = 'running'", &st, err);
        for (int i = 0; i < n && !rc; i++) {
            sqlite3_reset(st);
            bind_text(st, 1, items[i].why), bind_text(st, 2, items[i].id);
            s = step_done(st);
            if (s) rc = fail(db, err, s, "run %s: marking killed", items[i].id);
        }
        sqlite3_finalize(st);
    }
    for (int i = 0; i < n; i++) free(items[i].id);
    free(items);
    rc = end_write(db, rc, err);
    return rc ? rc : n;
}

int rundb_query(ml_rundb *db, const char *sql, int (*row)(void *ctx, int ncol, char **names, char **values),
                void *ctx, ml_err *err) {
    const char *tail = sql;
    int rc = ML_OK, stop = 0;
    while (!rc && !stop && tail && *tail) {
        sqlite3_stmt *st = NULL;
        const char *start = tail;
        int s = sqlite3_prepare_v2(db->db, start, -1, &st, &tail);
        if (s != SQLITE_OK) {
            rc = fail(db, err, s, "query");
            break;
        }
        if (!st) continue; /* whitespace or a comment */
        const int ncol = sqlite3_column_count(st);
        char **names = calloc((size_t)(ncol > 0 ? 2 * ncol : 1), sizeof(char *));
        if (!names) {
            sqlite3_finalize(st);
            return ml_errf(err, ML_ERUN, "%s: out of memory", db->path);
        }
        char **values = names + ncol;
        for (int i = 0; i < ncol; i++) names[i] = (char *)sqlite3_column_name(st, i);
        while ((s = sqlite3_step(st)) == SQLITE_ROW) {
            if (!row) continue;
            for (int i = 0; i < ncol; i++) values[i] = (char *)sqlite3_column_text(st, i);
            if (row(ctx, ncol, names, values)) {
                stop = 1;
                break;
            }
        }
        if (!stop && s != SQLITE_DONE) {
            if ((s & 0xff) == SQLITE_READONLY && db->readonly)
                rc = fail(db, err, s, "query (the database was opened read-only)");
            else
                rc = fail(db, err, s, "query");
        }
        free(names);
        sqlite3_finalize(st);
    }
    return rc;
}

char *rundb_quote(const char *s) {
    char *q = malloc(2 * strlen(s) + 3), *o = q;
    if (!q) abort();
    *o++ = '\'';
    for (; *s; s++) {
        if (*s == '\'') *o++ = '\'';
        *o++ = *s;
    }
    *o++ = '\'';
    *o = 0;
    return q;
}

void rundb_run_hash(const ml_config *cfg, char out[17]) {
    ml_config c = *cfg;
    memset(&c.run, 0, sizeof c.run);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (f) {
        config_write(&c, f);
        fclose(f);
    }
    rundb_config_hash(text ? text : "", out);
    free(text);
}

void rundb_config_hash(const char *config_text, char out[17]) {
    /* FNV-1a, 64 bit (Fowler, Noll, Vo; offset basis and prime from the reference) */
    uint64_t h = 14695981039346656037ULL;
    for (const unsigned char *p = (const unsigned char *)(config_text ? config_text : ""); *p; p++) {
        h ^= *p;
        h *= 1099511628211ULL;
    }
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}
