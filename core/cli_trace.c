/* cli_trace.c: `moelab trace summary|export`: per-layer imbalance over a window of a run's trace, and the raw
 * per-step, per-expert rows (or per-step metrics) as CSV/JSON for spreadsheets and gnuplot. A RUN is a trace
 * file, a run folder holding trace.h5, or a run id looked up in the run database. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "metrics.h"
#include "rundb.h"
#include "table.h"
#include "trace.h"
#include "window.h"

static int is_file(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static int first_value(void *ctx, int ncol, char **names, char **values) {
    (void)names;
    if (ncol > 0 && values[0]) snprintf((char *)ctx, 1024, "%s", values[0]);
    return 1;
}

int cli_resolve_trace(const char *run, const char *db_path, char *out, size_t cap, ml_err *err) {
    if (is_file(run)) return snprintf(out, cap, "%s", run), ML_OK;
    char buf[1100];
    snprintf(buf, sizeof buf, "%s/trace.h5", run);
    if (is_file(buf)) return snprintf(out, cap, "%s", buf), ML_OK;
    if (!is_file(db_path))
        return ml_errf(err, ML_EINPUT, "%s: no such trace file or run folder, and no run database at %s", run, db_path);
    ml_rundb *db;
    int rc = rundb_open(&db, db_path, 1, err);
    if (rc) return rc;
    char sql[600], found[1024] = "";
    char *q = rundb_quote(run);
    snprintf(sql, sizeof sql, "SELECT COALESCE(trace_path, '') FROM runs WHERE id = %s", q);
    free(q);
    rc = rundb_query(db, sql, first_value, found, err);
    rundb_close(db);
    if (rc) return rc;
    if (!found[0]) return ml_errf(err, ML_EINPUT, "%s: no such run in %s (and not a trace file or run folder)", run, db_path);
    if (!is_file(found)) return ml_errf(err, ML_EINPUT, "run %s: its trace %s is missing", run, found);
    snprintf(out, cap, "%s", found);
    return ML_OK;
}

typedef struct {
    const char *run, *db, *steps, *format, *what;
    int layer, metrics;
} trace_args;

static void trace_usage(FILE *f) {
    fprintf(f, "usage: moelab trace summary RUN [--layer L] [--steps A:B] [--format table|csv|json] [--db PATH]\n"
               "       moelab trace export RUN [--layer L] [--steps A:B] [--metrics] [--format csv|json|table]\n\n"
               "RUN is a trace.h5, a run folder, or a run id in the database (--db, default runs.db).\n"
               "summary: per layer over the window: MaxVio per step (mean and max; (max load - mean) / mean), and\n"
               "  over the window's summed loads: relative deviation of the min- and max-loaded expert from\n"
               "  uniform, coefficient of variation, normalised entropy, Gini, dead experts, top/bottom-20%%\n"
               "  shares, dropped fraction.\n"
               "export: one row per (step, layer, expert): load, selected, gate_mean, bias; with --metrics one\n"
               "  row per (step, layer) with that step's imbalance metrics instead.\n");
}

static int parse_args(int argc, char **argv, trace_args *a, ml_err *err) {
    memset(a, 0, sizeof *a);
    a->db = "runs.db", a->format = NULL, a->layer = -1;
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--layer") && i + 1 < argc) {
            char *end;
            a->layer = (int)strtol(argv[++i], &end, 10);
            if (*end || a->layer < 0) return ml_errf(err, ML_EINPUT, "--layer: '%s' is not a layer number", argv[i]);
        } else if (!strcmp(o, "--steps") && i + 1 < argc) a->steps = argv[++i];
        else if (!strcmp(o, "--format") && i + 1 < argc) a->format = argv[++i];
        else if (!strcmp(o, "--db") && i + 1 < argc) a->db = argv[++i];
        else if (!strcmp(o, "--metrics")) a->metrics = 1;
        else if (o[0] == '-') return ml_errf(err, ML_EINPUT, "unknown option '%s'", o);
        else if (!a->run) a->run = o;
        else return ml_errf(err, ML_EINPUT, "unexpected argument '%s'", o);
    }
    if (!a->run) return ml_errf(err, ML_EINPUT, "which run? (a trace.h5, run folder or run id)");
    return ML_OK;
}

/* The trace's shape, --layer checked against it, and the rows of the --steps window. */
static int open_window(const trace_args *a, const char *path, ml_trace_info *info, int64_t *r0, int64_t *r1,
                       int64_t **steps, ml_err *err) {
    int rc = trace_info(path, info, err);
    if (rc) return rc;
    if (a->layer >= info->L)
        return ml_errf(err, ML_EINPUT, "--layer %d: the trace has layers 0..%d", a->layer, info->L - 1);
    return window_rows(path, info, a->steps, "--steps", r0, r1, steps, err);
}

static int trace_summary(const trace_args *a, const char *path, ml_err *err) {
    ml_trace_info info;
    int64_t r0, r1, *steps;
    int rc = open_window(a, path, &info, &r0, &r1, &steps, err);
    if (rc) return rc;
    const int64_t n = r1 - r0;
    const int E = info.E;
    if (n <= 0) {
        free(steps);
        return ml_errf(err, ML_EINPUT, "%s: no logged steps in the window %s", path, a->steps ? a->steps : "(all)");
    }
    int32_t *load = malloc(sizeof(int32_t) * n * E), *k = malloc(sizeof(int32_t) * n * info.L),
            *dropped = malloc(sizeof(int32_t) * n * info.L);
    double *sum = malloc(sizeof(double) * E), *one = malloc(sizeof(double) * E);
    if ((rc = trace_read_rows_i32(path, "topk", r0, n, k, err)) ||
        (rc = trace_read_rows_i32(path, "dropped", r0, n, dropped, err)))
        goto out;
    const char *cols[] = {"layer", "k", "steps", "maxvio_mean", "maxvio_max", "min_dev", "max_dev", "cv", "entropy",
                          "gini", "dead", "top20_share", "bottom20_share", "dropped_frac"};
    ml_table t;
    table_init(&t, 14, cols);
    for (int l = 0; l < info.L; l++) {
        if (a->layer >= 0 && l != a->layer) continue;
        if (k[(n - 1) * info.L + l] == 0) continue; /* dense layer */
        if ((rc = trace_read_layer_i32(path, "load", l, r0, n, load, err))) break;
        double vio_sum = 0, vio_max = 0, drops = 0, kept = 0, ksum = 0;
        for (int e = 0; e < E; e++) sum[e] = 0;
        for (int64_t i = 0; i < n; i++) {
            for (int e = 0; e < E; e++) sum[e] += one[e] = load[i * E + e];
            ml_load_metrics mt;
            metrics_compute(&mt, one, E);
            vio_sum += mt.maxvio, vio_max = mt.maxvio > vio_max ? mt.maxvio : vio_max;
            kept += mt.total, drops += dropped[i * info.L + l], ksum += k[i * info.L + l];
        }
        ml_load_metrics w;
        metrics_compute(&w, sum, E);
        table_addf(&t, "%d\t%.3g\t%lld\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%d\t%.4f\t%.4f\t%.4f", l, ksum / n,
                   (long long)n, vio_sum / n, vio_max, w.min_dev, w.max_dev, w.cv, w.entropy, w.gini, w.dead,
                   w.top20_share, w.bottom20_share, metrics_drop_fraction(kept, drops));
    }
    if (!rc) {
        int fmt = a->format ? table_format_parse(a->format) : TABLE_TEXT;
        if (fmt == TABLE_TEXT)
            printf("%s: run %s, steps %lld..%lld (%lld logged), %d layers x %d experts\n", path, info.run_id,
                   (long long)steps[r0], (long long)steps[r1 - 1], (long long)n, info.L, E);
        table_print(&t, fmt, stdout);
    }
    table_free(&t);
out:
    free(load), free(k), free(dropped), free(sum), free(one), free(steps);
    return rc;
}

static int trace_export(const trace_args *a, const char *path, ml_err *err) {
    ml_trace_info info;
    int64_t r0, r1, *steps;
    int rc = open_window(a, path, &info, &r0, &r1, &steps, err);
    if (rc) return rc;
    const int64_t n = r1 - r0;
    const int E = info.E;
    int fmt = a->format ? table_format_parse(a->format) : TABLE_CSV;
    int32_t *load = malloc(sizeof(int32_t) * (n ? n : 1) * E), *sel = malloc(sizeof(int32_t) * (n ? n : 1) * E);
    float *gate = malloc(sizeof(float) * (n ? n : 1) * E), *bias = malloc(sizeof(float) * (n ? n : 1) * E);
    double *one = malloc(sizeof(double) * E);
    ml_table t;
    if (a->metrics) {
        const char *cols[] = {"step", "layer", "maxvio", "min_dev", "max_dev", "cv", "entropy", "gini", "dead"};
        table_init(&t, 9, cols);
    } else {
        const char *cols[] = {"step", "layer", "expert", "load", "selected", "gate_mean", "bias"};
        table_init(&t, 7, cols);
    }
    /* streamed layer by layer, then sorted by (step, layer) through the row order of the loops below */
    for (int l = 0; l < info.L && n > 0 && !rc; l++) {
        if (a->layer >= 0 && l != a->layer) continue;
        if ((rc = trace_read_layer_i32(path, "load", l, r0, n, load, err)) ||
            (rc = trace_read_layer_i32(path, "selected", l, r0, n, sel, err)) ||
            (rc = trace_read_layer_f32(path, "gate_mean", l, r0, n, gate, err)) ||
            (rc = trace_read_layer_f32(path, "bias", l, r0, n, bias, err)))
            break;
        for (int64_t i = 0; i < n; i++) {
            if (a->metrics) {
                for (int e = 0; e < E; e++) one[e] = load[i * E + e];
                ml_load_metrics mt;
                metrics_compute(&mt, one, E);
                table_addf(&t, "%lld\t%d\t%.6g\t%.6g\t%.6g\t%.6g\t%.6g\t%.6g\t%d", (long long)steps[r0 + i], l, mt.maxvio,
                           mt.min_dev, mt.max_dev, mt.cv, mt.entropy, mt.gini, mt.dead);
            } else {
                for (int e = 0; e < E; e++)
                    table_addf(&t, "%lld\t%d\t%d\t%d\t%d\t%.7g\t%.7g", (long long)steps[r0 + i], l, e, load[i * E + e],
                               sel[i * E + e], gate[i * E + e], bias[i * E + e]);
            }
        }
    }
    if (!rc) table_print(&t, fmt, stdout);
    table_free(&t);
    free(load), free(sel), free(gate), free(bias), free(one), free(steps);
    return rc;
}

int cli_trace(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        trace_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return trace_usage(stdout), 0;
    trace_args a;
    ml_err err = {0};
    char path[1100];
    int rc = parse_args(argc, argv, &a, &err);
    if (!rc && a.format && table_format_parse(a.format) < 0)
        rc = ml_errf(&err, ML_EINPUT, "--format: '%s' is not table, csv or json", a.format);
    if (!rc) rc = cli_resolve_trace(a.run, a.db, path, sizeof path, &err);
    if (!rc) {
        if (!strcmp(argv[1], "summary")) rc = trace_summary(&a, path, &err);
        else if (!strcmp(argv[1], "export")) rc = trace_export(&a, path, &err);
        else rc = ml_errf(&err, ML_EINPUT, "unknown trace command '%s' (summary, export)", argv[1]);
    }
    if (rc) {
        fprintf(stderr, "moelab trace: %s\n", err.msg);
        return 2;
    }
    return 0;
}
