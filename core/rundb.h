/* rundb.h: the run database (SQLite, WAL): one row per run with its status, and the run's flattened config
 * (params), metrics over steps and final summary. Several processes (sweep workers) write it at once: WAL
 * mode, a busy timeout, and short transactions (BEGIN IMMEDIATE) keep every write. Schema version
 * ML_RUNDB_SCHEMA is kept in PRAGMA user_version, with migrations from older versions.
 * Tables:
 *   experiments(name PRIMARY KEY, description, file, created)
 *   runs(id PRIMARY KEY, experiment, name, status CHECK in queued|running|finished|failed|killed, config,
 *        config_hash, created, started, finished, host, pid, heartbeat, backend, world_size, run_dir,
 *        trace_path, error)
 *   params(run, key, value, PRIMARY KEY(run, key))        -- dotted config keys, values as text
 *   metrics(run, step, key, value, PRIMARY KEY(run, step, key))
 *   summary(run, key, value, PRIMARY KEY(run, key))
 * Timestamps are ISO-8601 UTC text. */
#ifndef MOELAB_RUNDB_H
#define MOELAB_RUNDB_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "err.h"

#define ML_RUNDB_SCHEMA 1

typedef struct ml_rundb ml_rundb;

/* Opens (creating or migrating unless readonly) the database at path. A file that is not SQLite, or a
 * SQLite database without moelab's tables (and not empty), or of a newer schema, gives ML_EINPUT naming
 * the file. readonly opens with SQLITE_OPEN_READONLY (and query_only) for `runs query`. */
int rundb_open(ml_rundb **db, const char *path, int readonly, ml_err *err);
void rundb_close(ml_rundb *db);

/* Inserts the experiment if new (idempotent: an existing row keeps its description). A NULL or "" name is no
 * experiment: nothing happens. */
int rundb_add_experiment(ml_rundb *db, const char *name, const char *description, const char *file, ml_err *err);

/* Inserts a run (status 'queued') with its config text, hash and flattened params; an existing id is an
 * error unless the config hash matches (then nothing changes). experiment NULL or "" = none, otherwise it must
 * have been added; config_hash NULL = the hash of config_text (or, without text, of cfg's key=value lines);
 * cfg NULL = no params. */
int rundb_add_run(ml_rundb *db, const char *id, const char *experiment, const char *name, const ml_config *cfg,
                  const char *config_text, const char *config_hash, const char *run_dir, const char *backend,
                  int world_size, ml_err *err);

/* Status changes: 'running' records started (the first time only), host, pid, heartbeat and clears finished
 * and error; 'finished'/'failed'/'killed' record finished (and error, may be NULL); 'queued' clears finished.
 * An unknown status or run id is ML_EINPUT. */
int rundb_set_status(ml_rundb *db, const char *id, const char *status, const char *error, ml_err *err);
int rundb_heartbeat(ml_rundb *db, const char *id, ml_err *err);
int rundb_set_trace_path(ml_rundb *db, const char *id, const char *trace_path, ml_err *err);

/* Metrics at a step (one transaction for all n keys; a key logged again at a step replaces the value), and
 * final summary values (upserted). NaN is stored as NULL. */
int rundb_log_metrics(ml_rundb *db, const char *id, int64_t step, int n, const char *const *keys,
                      const double *values, ml_err *err);
int rundb_set_summary(ml_rundb *db, const char *id, const char *key, double value, ml_err *err);

/* Marks as 'killed' every 'running' run whose process is gone: same host and pid not alive, or a heartbeat
 * older than stale_seconds (<= 0: that rule is off). Returns how many were marked (>= 0) or an error. */
int rundb_reap(ml_rundb *db, int stale_seconds, ml_err *err);

/* Runs sql (any statements, ';'-separated; read-only when the db was opened readonly) and calls row() (may
 * be NULL) for every result row with column names and text values (NULL for SQL NULL); row() returns
 * non-zero to stop, which is not an error. SQL errors are ML_EINPUT with SQLite's message. */
int rundb_query(ml_rundb *db, const char *sql, int (*row)(void *ctx, int ncol, char **names, char **values),
                void *ctx, ml_err *err);

/* s as an SQL string literal ('...' with single quotes doubled), malloc'd: for building rundb_query text. */
char *rundb_quote(const char *s);

/* The FNV-1a hash of a text, as 16 hex digits. */
void rundb_config_hash(const char *config_text, char out[17]);

/* The hash that identifies a run: that of its resolved config (config_write) without the run.* keys, which
 * say where a run lives and what it is called, not what it computes. */
void rundb_run_hash(const ml_config *cfg, char out[17]);

/* A run found by rundb_find_run. */
typedef struct {
    char id[128];
    char status[16];
    char run_dir[512];
} ml_run_ref;

/* Finds the newest run of experiment with this config hash: returns 1 and fills ref, 0 when there is none,
 * or an error. */
int rundb_find_run(ml_rundb *db, const char *experiment, const char *config_hash, ml_run_ref *ref, ml_err *err);

/* Claims a run for this process atomically: sets it 'running' (as rundb_set_status does) only if its status
 * is 'queued' or 'killed', or 'failed' when retry_failed. Returns 1 when claimed, 0 when the run is not
 * claimable (finished, failed, or running elsewhere), or an error. Two processes never both claim a run. */
int rundb_claim(ml_rundb *db, const char *id, int retry_failed, ml_err *err);

#endif
