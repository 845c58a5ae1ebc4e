/* cli_runs.c: `moelab runs list|show|compare|query`: find runs by status, experiment and hyperparameters,
 * look at one run (config, status, final metrics, per-layer imbalance from its trace), compare runs, or ask
 * the database anything in SQL (read-only). Output as a table, CSV or JSON. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "metrics.h"
#include "rundb.h"
#include "table.h"
#include "trace.h"

typedef struct {
    const char *db, *format, *experiment, *status;
    const char *where[32];
    int nwhere;
    const char *pos[64];
    int npos;
} runs_args;

static void runs_usage(FILE *f) {
    fprintf(f, "usage: moelab runs list [--experiment X] [--status S] [--where key=value ...]\n"
               "       moelab runs show ID\n"
               "       moelab runs compare ID ID [ID ...]\n"
               "       moelab runs query \"SELECT ...\"\n"
               "options everywhere: --db PATH (default runs.db)  --format table|csv|json\n\n"
               "list: one row per run with its status and final metrics; --where filters on any config key\n"
               "  (dotted, as in moelab train; numbers compare by value: --where balance.aux_coef=0.01).\n"
               "show: the run's row, final metrics, per-layer imbalance over its last logged steps, and config.\n"
               "compare: the config keys whose values differ, and the final metrics side by side.\n"
               "query: any SQL on the tables experiments, runs, params, metrics, summary (read-only).\n"
               "Runs whose process died are shown as killed.\n");
}

static int add_row(void *ctx, int ncol, char **names, char **values) {
    ml_table *t = ctx;
    if (t->ncol == 0) table_init(t, ncol, (const char *const *)names);
    table_add(t, (const char *const *)values);
    return 0;
}

static int print_query(ml_rundb *db, const char *sql, int fmt, ml_err *err) {
    ml_table t = {0};
    int rc = rundb_query(db, sql, add_row, &t, err);
    if (!rc) {
        if (t.ncol == 0) {
            if (fmt == TABLE_JSON) printf("[]\n");
            else if (fmt == TABLE_TEXT) printf("(no rows)\n");
        } else {
            table_print(&t, fmt, stdout);
        }
    }
    if (t.ncol) table_free(&t);
    return rc;
}

static int runs_list(ml_rundb *db, const runs_args *a, int fmt, ml_err *err) {
    char *sql = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&sql, &len);
    fprintf(f, "SELECT r.id, r.experiment, r.status, r.started, r.finished,"
               " (SELECT CAST(value AS INTEGER) FROM summary s WHERE s.run = r.id AND s.key = 'steps') AS steps,"
               " (SELECT printf('%%.4f', value) FROM summary s WHERE s.run = r.id AND s.key = 'val_loss') AS val_loss,"
               " (SELECT printf('%%.4f', value) FROM summary s WHERE s.run = r.id AND s.key = 'val_maxvio') AS val_maxvio,"
               " (SELECT value FROM params p WHERE p.run = r.id AND p.key = 'balance.policy') AS policy"
               " FROM runs r WHERE 1");
    if (a->experiment) {
        char *q = rundb_quote(a->experiment);
        fprintf(f, " AND r.experiment = %s", q);
        free(q);
    }
    if (a->status) {
        char *q = rundb_quote(a->status);
        fprintf(f, " AND r.status = %s", q);
        free(q);
    }
    for (int i = 0; i < a->nwhere; i++) {
        const char *eq = strchr(a->where[i], '=');
        char key[128];
        snprintf(key, sizeof key, "%.*s", (int)(eq - a->where[i]), a->where[i]);
        char *qk = rundb_quote(key), *qv = rundb_quote(eq + 1), *end;
        double num = strtod(eq + 1, &end);
        if (eq[1] && !*end && isfinite(num))
            fprintf(f, " AND EXISTS (SELECT 1 FROM params p WHERE p.run = r.id AND p.key = %s AND"
                       " (p.value = %s OR abs(CAST(p.value AS REAL) - %.17g) <= 1e-6 * abs(%.17g)))",
                    qk, qv, num, num);
        else
            fprintf(f, " AND EXISTS (SELECT 1 FROM params p WHERE p.run = r.id AND p.key = %s AND p.value = %s)", qk, qv);
        free(qk), free(qv);
    }
    fprintf(f, " ORDER BY r.created, r.id");
    fclose(f);
    int rc = print_query(db, sql, fmt, err);
    free(sql);
    return rc;
}

static int count_rows(void *ctx, int ncol, char **names, char **values) {
    (void)ncol, (void)names, (void)values;
    (*(int *)ctx)++;
    return 0;
}

static int run_exists(ml_rundb *db, const char *id, ml_err *err) {
    char *q = rundb_quote(id), sql[512];
    snprintf(sql, sizeof sql, "SELECT 1 FROM runs WHERE id = %s", q);
    free(q);
    int n = 0;
    int rc = rundb_query(db, sql, count_rows, &n, err);
    if (rc) return rc;
    return n ? ML_OK : ml_errf(err, ML_EINPUT, "no run '%s' in the database", id);
}

/* Per-layer imbalance over the last `window` logged steps of a trace. */
static int layer_table(const char *trace_path, int window, int fmt, ml_err *err) {
    ml_trace_info info;
    int rc = trace_info(trace_path, &info, err);
    if (rc) return rc;
    if (info.nsteps == 0) return printf("(trace has no steps yet)\n"), ML_OK;
    int64_t n = info.nsteps < window ? info.nsteps : window, r0 = info.nsteps - n;
    int32_t *load = malloc(sizeof(int32_t) * n * info.E), *k = malloc(sizeof(int32_t) * n * info.L);
    double *sum = calloc(info.E, sizeof(double)), *one = malloc(sizeof(double) * info.E);
    const char *cols[] = {"layer", "k", "maxvio_mean", "min_dev", "max_dev", "cv", "entropy", "dead"};
    ml_table t;
    table_init(&t, 8, cols);
    rc = trace_read_rows_i32(trace_path, "topk", r0, n, k, err);
    for (int l = 0; l < info.L && !rc; l++) {
        if (!k[(n - 1) * info.L + l]) continue;
        if ((rc = trace_read_layer_i32(trace_path, "load", l, r0, n, load, err))) break;
        double vio = 0;
        memset(sum, 0, sizeof(double) * info.E);
        for (int64_t i = 0; i < n; i++) {
            for (int e = 0; e < info.E; e++) sum[e] += one[e] = load[i * info.E + e];
            ml_load_metrics mt;
            metrics_compute(&mt, one, info.E);
            vio += mt.maxvio;
        }
        ml_load_metrics w;
        metrics_compute(&w, sum, info.E);
        table_addf(&t, "%d\t%d\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%d", l, k[(n - 1) * info.L + l], vio / n, w.min_dev,
                   w.max_dev, w.cv, w.entropy, w.dead);
    }
    if (!rc) {
        if (fmt == TABLE_TEXT) printf("\nper-layer imbalance over the last %lld logged steps (%s):\n", (long long)n, trace_path);
        table_print(&t, fmt, stdout);
    }
    table_free(&t);
    free(load), free(k), free(sum), free(one);
    return rc;
}

static int runs_show(ml_rundb *db, const runs_args *a, int fmt, ml_err *err) {
    if (a->npos != 1) return ml_errf(err, ML_EINPUT, "runs show takes one run id");
    const char *id = a->pos[0];
    int rc = run_exists(db, id, err);
    if (rc) return rc;
    char *q = rundb_quote(id), sql[1024];
    if (fmt == TABLE_JSON) printf("{\"run\": ");
    snprintf(sql, sizeof sql,
             "SELECT id, experiment, name, status, created, started, finished, host, pid, heartbeat, backend,"
             " world_size, run_dir, trace_path, config_hash, error FROM runs WHERE id = %s", q);
    if (fmt == TABLE_TEXT) {
        /* one run: field / value lines read better than one wide row */
        ml_table row = {0}, vertical;
        if ((rc = rundb_query(db, sql, add_row, &row, err))) goto out;
        const char *cols[] = {"field", "value"};
        table_init(&vertical, 2, cols);
        for (int c = 0; c < row.ncol; c++) table_add(&vertical, (const char *const[]){row.names[c], row.cells[c]});
        table_print(&vertical, fmt, stdout);
        table_free(&vertical);
        table_free(&row);
    } else if ((rc = print_query(db, sql, fmt, err))) {
        goto out;
    }
    if (fmt == TABLE_TEXT) printf("\nfinal metrics:\n");
    if (fmt == TABLE_JSON) printf(", \"summary\": ");
    snprintf(sql, sizeof sql, "SELECT key, printf('%%.6g', value) AS value FROM summary WHERE run = %s ORDER BY key", q);
    if ((rc = print_query(db, sql, fmt, err))) goto out;
    char trace_path[1024] = "";
    snprintf(sql, sizeof sql, "SELECT COALESCE(trace_path, '') FROM runs WHERE id = %s", q);
    {
        ml_table t = {0};
        rc = rundb_query(db, sql, add_row, &t, err);
        if (t.nrow && t.cells[0]) snprintf(trace_path, sizeof trace_path, "%s", t.cells[0]);
        if (t.ncol) table_free(&t);
        if (rc) goto out;
    }
    if (fmt == TABLE_JSON) printf(", \"layers\": ");
    if (trace_path[0] && access(trace_path, R_OK) == 0) {
        if ((rc = layer_table(trace_path, 100, fmt, err))) goto out;
    } else if (fmt == TABLE_JSON) {
        printf("[]");
    } else if (fmt == TABLE_TEXT) {
        printf("\n(no trace%s%s)\n", trace_path[0] ? " at " : "", trace_path);
    }
    if (fmt == TABLE_TEXT) printf("\nconfig:\n");
    if (fmt == TABLE_JSON) printf(", \"params\": ");
    snprintf(sql, sizeof sql, "SELECT key, value FROM params WHERE run = %s ORDER BY rowid", q);
    rc = print_query(db, sql, fmt, err);
    if (fmt == TABLE_JSON) printf("}\n");
out:
    free(q);
    return rc;
}

static int runs_compare(ml_rundb *db, const runs_args *a, int fmt, ml_err *err) {
    if (a->npos < 2) return ml_errf(err, ML_EINPUT, "runs compare takes two or more run ids");
    int rc;
    for (int i = 0; i < a->npos; i++)
        if ((rc = run_exists(db, a->pos[i], err))) return rc;
    char *sql = NULL, *ids = NULL;
    size_t len = 0, ilen = 0;
    FILE *fi = open_memstream(&ids, &ilen);
    for (int i = 0; i < a->npos; i++) {
        char *q = rundb_quote(a->pos[i]);
        fprintf(fi, "%s%s", i ? ", " : "", q);
        free(q);
    }
    fclose(fi);
    /* params: keys whose values are not all equal (or missing in some run) */
    FILE *f = open_memstream(&sql, &len);
    fprintf(f, "SELECT k.key AS key");
    for (int i = 0; i < a->npos; i++) {
        char *q = rundb_quote(a->pos[i]);
        fprintf(f, ", (SELECT value FROM params p WHERE p.run = %s AND p.key = k.key) AS %s", q, q);
        free(q);
    }
    fprintf(f, " FROM (SELECT key, MIN(rowid) AS o FROM params WHERE run IN (%s) GROUP BY key"
               " HAVING COUNT(DISTINCT value) > 1 OR COUNT(*) < %d) k ORDER BY k.o", ids, a->npos);
    fclose(f);
    if (fmt == TABLE_TEXT) printf("config keys that differ:\n");
    if (fmt == TABLE_JSON) printf("{\"params\": ");
    rc = print_query(db, sql, fmt, err);
    free(sql);
    if (!rc) {
        sql = NULL;
        f = open_memstream(&sql, &len);
        fprintf(f, "SELECT k.key AS metric");
        for (int i = 0; i < a->npos; i++) {
            char *q = rundb_quote(a->pos[i]);
            fprintf(f, ", (SELECT printf('%%.6g', value) FROM summary s WHERE s.run = %s AND s.key = k.key) AS %s", q, q);
            free(q);
        }
        fprintf(f, " FROM (SELECT DISTINCT key FROM summary WHERE run IN (%s)) k ORDER BY k.key", ids);
        fclose(f);
        if (fmt == TABLE_TEXT) printf("\nfinal metrics:\n");
        if (fmt == TABLE_JSON) printf(", \"summary\": ");
        rc = print_query(db, sql, fmt, err);
        if (fmt == TABLE_JSON) printf("}\n");
        free(sql);
    }
    free(ids);
    return rc;
}

int cli_runs(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        runs_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    runs_args a = {.db = "runs.db"};
    ml_err err = {0};
    int rc = ML_OK;
    for (int i = 2; i < argc && !rc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) return runs_usage(stdout), 0;
        if (!strcmp(o, "--db") && i + 1 < argc) a.db = argv[++i];
        else if (!strcmp(o, "--format") && i + 1 < argc) a.format = argv[++i];
        else if (!strcmp(o, "--experiment") && i + 1 < argc) a.experiment = argv[++i];
        else if (!strcmp(o, "--status") && i + 1 < argc) a.status = argv[++i];
        else if (!strcmp(o, "--where") && i + 1 < argc) {
            if (!strchr(argv[i + 1], '=') || argv[i + 1][0] == '=' || a.nwhere == 32)
                rc = ml_errf(&err, ML_EINPUT, "--where: expected key=value, got '%s'", argv[i + 1]);
            a.where[a.nwhere++] = argv[++i];
        } else if (o[0] == '-' && o[1]) rc = ml_errf(&err, ML_EINPUT, "unknown option '%s'", o);
        else if (a.npos < 64) a.pos[a.npos++] = o;
    }
    int fmt = a.format ? table_format_parse(a.format) : TABLE_TEXT;
    if (!rc && fmt < 0) rc = ml_errf(&err, ML_EINPUT, "--format: '%s' is not table, csv or json", a.format);
    static const char *const statuses[] = {"queued", "running", "finished", "failed", "killed", NULL};
    if (!rc && a.status) {
        int ok = 0;
        for (int i = 0; statuses[i]; i++) ok |= !strcmp(a.status, statuses[i]);
        if (!ok) rc = ml_errf(&err, ML_EINPUT, "--status: '%s' is not queued, running, finished, failed or killed", a.status);
    }
    const char *cmd = argv[1];
    if (!rc && strcmp(cmd, "list") && strcmp(cmd, "show") && strcmp(cmd, "compare") && strcmp(cmd, "query"))
        rc = ml_errf(&err, ML_EINPUT, "unknown runs command '%s' (list, show, compare, query)", cmd);
    if (!rc && access(a.db, F_OK)) rc = ml_errf(&err, ML_EINPUT, "%s: no run database here (use --db PATH)", a.db);
    ml_rundb *db = NULL;
    const int query = !rc && !strcmp(cmd, "query");
    if (!rc && !query) {
        /* not read-only: runs whose process died are marked killed before anything is shown */
        rc = rundb_open(&db, a.db, 0, &err);
        if (!rc && rundb_reap(db, 600, &err) < 0) rc = err.code;
    } else if (!rc) {
        rc = rundb_open(&db, a.db, 1, &err);
    }
    if (!rc) {
        if (!strcmp(cmd, "list")) rc = a.npos ? ml_errf(&err, ML_EINPUT, "runs list takes no run ids") : runs_list(db, &a, fmt, &err);
        else if (!strcmp(cmd, "show")) rc = runs_show(db, &a, fmt, &err);
        else if (!strcmp(cmd, "compare")) rc = runs_compare(db, &a, fmt, &err);
        else if (a.npos != 1) rc = ml_errf(&err, ML_EINPUT, "runs query takes one SQL statement (quote it)");
        else rc = print_query(db, a.pos[0], fmt, &err);
    }
    if (db) rundb_close(db);
    if (rc) {
        fprintf(stderr, "moelab runs: %s\n", err.msg);
        return 2;
    }
    return 0;
}
