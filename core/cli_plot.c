/* cli_plot.c: `moelab plot heatmap|deviation|fp|loss|maxvio`: writes the figure's data file (analysis/plotdata.c
 * for trace figures, the run database's metrics for curves) and runs the matching gnuplot script in plots/.
 * The terminal follows the output's extension (.png, .svg, .pdf). The image and data are written under
 * temporary names and renamed, so a failure leaves neither half-written. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli.h"
#include "plot.h"
#include "plotdata.h"
#include "rundb.h"
#include "trace.h"
#include "window.h"

#define MAX_BINS 800
#define MAX_SERIES 64

static void plot_usage(FILE *f) {
    fprintf(f,
            "usage: moelab plot heatmap   --run RUN --layer L [--window A:B] [--log] -o OUT\n"
            "       moelab plot heatmap   --run RUN (--step S | --window A:B) [--log] -o OUT\n"
            "       moelab plot deviation --run RUN [--step S | --window A:B] -o OUT\n"
            "       moelab plot deviation --run RUN --layers 0,3 --over-training [--window A:B] -o OUT\n"
            "       moelab plot fp        --run RUN --layers 0,3 [--step S | --window A:B] -o OUT\n"
            "       moelab plot loss|maxvio (--runs A,B,C | --experiment X) [--group-by KEY] [--layer L] -o OUT\n\n"
            "heatmap    load of each expert as a multiple of the uniform share (white = uniform): experts x steps\n"
            "           for one layer, or layers x experts at a step or summed over a window (--log: log2 scale)\n"
            "deviation  per layer, relative deviation of the min- and max-loaded experts from uniform\n"
            "           (Sigma-MoE-Tiny Fig. 2a), over a window's summed loads (default: the last 10%% of the\n"
            "           trace); --over-training: the same over training for the --layers\n"
            "fp         per expert, sorted token fraction f and mean gate probability p vs the uniform 1/E\n"
            "           (Fig. 2b/2c)\n"
            "loss       training loss (lines) and validation loss (points) of several runs\n"
            "maxvio     MaxVio of the worst layer per step (or of --layer L, from the traces) and on validation\n\n"
            "RUN is a trace.h5, a run folder or a run id in the database; --runs take ids, --experiment a name.\n"
            "--group-by KEY averages the runs that share a value of a config key (e.g. seeds); legends show the\n"
            "config keys that differ between the curves. OUT ends in .png, .svg or .pdf; the numbers go to\n"
            "--data FILE (default: OUT with .dat instead of its extension).\n"
            "  --db PATH      run database (default runs.db)     --title TEXT   figure title\n");
}

typedef struct {
    const char *kind, *run, *runs, *experiment, *group_by, *window, *step, *out, *data, *db, *title, *layers;
    int layer, log, over_training;
} plot_args;

static int parse_int_list(const char *s, int *out, int cap, ml_err *err) {
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || (*end && *end != ',')) return ml_errf(err, ML_EINPUT, "--layers: '%s' is not like 0,3", s);
        if (n == cap) return ml_errf(err, ML_EINPUT, "--layers: more than %d layers", cap);
        out[n++] = (int)v;
        p = *end ? end + 1 : end;
    }
    if (!n) return ml_errf(err, ML_EINPUT, "--layers: empty");
    return n;
}

static int parse_args(int argc, char **argv, plot_args *a, ml_err *err) {
    memset(a, 0, sizeof *a);
    a->layer = -1, a->db = "runs.db";
    a->kind = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        const int v = i + 1 < argc;
        if (!strcmp(o, "--run") && v) a->run = argv[++i];
        else if (!strcmp(o, "--runs") && v) a->runs = argv[++i];
        else if (!strcmp(o, "--experiment") && v) a->experiment = argv[++i];
        else if (!strcmp(o, "--group-by") && v) a->group_by = argv[++i];
        else if ((!strcmp(o, "--window") || !strcmp(o, "--steps")) && v) a->window = argv[++i];
        else if (!strcmp(o, "--step") && v) a->step = argv[++i];
        else if ((!strcmp(o, "-o") || !strcmp(o, "--out")) && v) a->out = argv[++i];
        else if (!strcmp(o, "--data") && v) a->data = argv[++i];
        else if (!strcmp(o, "--db") && v) a->db = argv[++i];
        else if (!strcmp(o, "--title") && v) a->title = argv[++i];
        else if (!strcmp(o, "--layers") && v) a->layers = argv[++i];
        else if (!strcmp(o, "--log")) a->log = 1;
        else if (!strcmp(o, "--over-training")) a->over_training = 1;
        else if (!strcmp(o, "--layer") && v) {
            char *end;
            a->layer = (int)strtol(argv[++i], &end, 10);
            if (*end || a->layer < 0 || end == argv[i])
                return ml_errf(err, ML_EINPUT, "--layer: '%s' is not a layer number", argv[i]);
        } else return ml_errf(err, ML_EINPUT, "unknown option or missing value '%s' (see moelab plot --help)", o);
    }
    if (!a->out) return ml_errf(err, ML_EINPUT, "-o OUT is required (a .png, .svg or .pdf path)");
    if (a->step && a->window) return ml_errf(err, ML_EINPUT, "give --step or --window, not both");
    return ML_OK;
}

/* ---- the window of a trace figure ---- */

typedef struct {
    char path[1100];
    ml_trace_info info;
    int64_t r0, r1, *steps;
} trace_window;

/* Resolves RUN to its trace and the figure's rows: --step, --window, or the default (all rows, or the last
 * 10% when tail_default). */
static int open_trace(const plot_args *a, trace_window *w, int tail_default, ml_err *err) {
    memset(w, 0, sizeof *w);
    if (!a->run) return ml_errf(err, ML_EINPUT, "--run RUN is required for plot %s", a->kind);
    int rc = cli_resolve_trace(a->run, a->db, w->path, sizeof w->path, err);
    if (!rc) rc = trace_info(w->path, &w->info, err);
    if (rc) return rc;
    const char *spec = a->step ? a->step : a->window;
    rc = window_rows(w->path, &w->info, spec, a->step ? "--step" : "--window", &w->r0, &w->r1, &w->steps, err);
    if (rc) return rc;
    if (!spec && tail_default) w->r0 = w->r1 - (w->r1 + 9) / 10;
    if (w->r1 <= w->r0) {
        free(w->steps);
        return ml_errf(err, ML_EINPUT, "%s: no logged steps in %s %s", w->path, a->step ? "--step" : "--window",
                       spec ? spec : "(all)");
    }
    return ML_OK;
}

static void window_text(const trace_window *w, char *buf, size_t n) {
    if (w->r1 - w->r0 == 1) snprintf(buf, n, "step %lld", (long long)w->steps[w->r0]);
    else snprintf(buf, n, "steps %lld-%lld", (long long)w->steps[w->r0], (long long)w->steps[w->r1 - 1]);
}

/* ---- gnuplot ---- */

/* Appends name='value' (single quotes doubled, gnuplot's escape) to the -e assignments. */
static void set_str(FILE *f, const char *name, const char *value) {
    fprintf(f, "%s='", name);
    for (const char *p = value; *p; p++) {
        if (*p == '\'') fputc('\'', f);
        fputc(*p, f);
    }
    fprintf(f, "'; ");
}

static int run_gnuplot(const char *script, const char *assignments, ml_err *err) {
    const char *gp = getenv("MOELAB_GNUPLOT");
    if (!gp || !gp[0]) gp = "gnuplot";
    int errpipe[2];
    if (pipe(errpipe)) return ml_errf(err, ML_ERUN, "pipe: %s", strerror(errno));
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return ml_errf(err, ML_ERUN, "fork: %s", strerror(errno));
    if (pid == 0) {
        dup2(errpipe[1], 2), dup2(errpipe[1], 1);
        close(errpipe[0]), close(errpipe[1]);
        execlp(gp, gp, "-e", assignments, script, (char *)NULL);
        fprintf(stderr, "exec %s: %s", gp, strerror(errno));
        _exit(127);
    }
    close(errpipe[1]);
    char msg[2048];
    size_t len = 0;
    ssize_t got;
    while ((got = read(errpipe[0], msg + len, sizeof msg - 1 - len)) > 0) len += (size_t)got;
    msg[len] = 0;
    close(errpipe[0]);
    int status;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
        return ml_errf(err, ML_EINPUT, "gnuplot not found (install it: apt-get install gnuplot-nox; or set MOELAB_GNUPLOT)");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return ml_errf(err, ML_ERUN, "gnuplot %s failed: %.900s", script, msg);
    return ML_OK;
}

/* ---- curves from the run database ---- */

typedef struct {
    int n, cap;
    double *x, *y, *v;
} series;

static void series_put(series *s, double x, double y, double v) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        s->x = realloc(s->x, sizeof(double) * s->cap), s->y = realloc(s->y, sizeof(double) * s->cap);
        s->v = realloc(s->v, sizeof(double) * s->cap);
    }
    s->x[s->n] = x, s->y[s->n] = y, s->v[s->n] = v, s->n++;
}

static void series_free(series *s) {
    free(s->x), free(s->y), free(s->v);
    memset(s, 0, sizeof *s);
}

typedef struct {
    char id[128], name[128], trace[1024];
    char **keys, **values; /* params */
    int nparams;
    series s;
} curve_run;

static int collect_text(void *ctx, int ncol, char **names, char **values) {
    (void)names;
    char ***list = ctx; /* NULL-terminated growing list of strings (column 0) */
    int n = 0;
    while (*list && (*list)[n]) n++;
    *list = realloc(*list, sizeof(char *) * (n + 2));
    (*list)[n] = strdup(ncol > 0 && values[0] ? values[0] : "");
    (*list)[n + 1] = NULL;
    return 0;
}

static void free_list(char **l) {
    for (int i = 0; l && l[i]; i++) free(l[i]);
    free(l);
}

typedef struct {
    curve_run *r;
    int what; /* 0 params, 1 metric y, 2 metric v */
} fill_ctx;

static int fill_cb(void *ctx, int ncol, char **names, char **v) {
    (void)names;
    fill_ctx *c = ctx;
    if (ncol < 2) return 0;
    if (c->what == 0) {
        c->r->keys = realloc(c->r->keys, sizeof(char *) * (c->r->nparams + 1));
        c->r->values = realloc(c->r->values, sizeof(char *) * (c->r->nparams + 1));
        c->r->keys[c->r->nparams] = strdup(v[0] ? v[0] : "");
        c->r->values[c->r->nparams] = strdup(v[1] ? v[1] : "");
        c->r->nparams++;
    } else if (c->what == 1) {
        series_put(&c->r->s, atof(v[0]), v[1] ? atof(v[1]) : NAN, NAN);
    } else {
        /* validation values land on the training row of the same step, or on a row of their own */
        double x = atof(v[0]), val = v[1] ? atof(v[1]) : NAN;
        int i = c->r->s.n - 1;
        while (i >= 0 && c->r->s.x[i] > x) i--;
        if (i >= 0 && c->r->s.x[i] == x) c->r->s.v[i] = val;
        else series_put(&c->r->s, x, NAN, val);
    }
    return 0;
}

static int cmp_x(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static const char *param(const curve_run *r, const char *key) {
    for (int i = 0; i < r->nparams; i++)
        if (!strcmp(r->keys[i], key)) return r->values[i];
    return NULL;
}

static const char *short_key(const char *k) {
    const char *dot = strrchr(k, '.');
    return dot ? dot + 1 : k;
}

/* Loads the runs of --runs / --experiment with params and the series of the figure. */
static int load_runs(const plot_args *a, curve_run **out, int *nout, ml_err *err) {
    if (!a->runs == !a->experiment) return ml_errf(err, ML_EINPUT, "give --runs A,B,... or --experiment NAME");
    if (access(a->db, R_OK)) return ml_errf(err, ML_EINPUT, "%s: no run database here (--db PATH)", a->db);
    ml_rundb *db;
    int rc = rundb_open(&db, a->db, 1, err);
    if (rc) return rc;
    char **ids = NULL, sql[2048];
    if (a->runs) {
        char *copy = strdup(a->runs), *save = NULL;
        for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            char *q = rundb_quote(t);
            char **found = NULL;
            snprintf(sql, sizeof sql, "SELECT id FROM runs WHERE id = %s", q);
            free(q);
            rc = rundb_query(db, sql, collect_text, &found, err);
            if (!rc && !found) rc = ml_errf(err, ML_EINPUT, "run %s: not in %s", t, a->db);
            if (!rc) collect_text(&ids, 1, NULL, (char *[]){found[0]});
            free_list(found);
            if (rc) break;
        }
        free(copy);
    } else {
        char *q = rundb_quote(a->experiment);
        snprintf(sql, sizeof sql, "SELECT id FROM runs WHERE experiment = %s ORDER BY name, id", q);
        free(q);
        rc = rundb_query(db, sql, collect_text, &ids, err);
        if (!rc && !ids) rc = ml_errf(err, ML_EINPUT, "experiment %s: no runs in %s", a->experiment, a->db);
    }
    int n = 0;
    while (ids && ids[n]) n++;
    if (!rc && n > 256) rc = ml_errf(err, ML_EINPUT, "%d runs: too many curves for one figure (at most 256)", n);
    curve_run *runs = rc ? NULL : calloc((size_t)n, sizeof *runs);
    for (int i = 0; i < n && !rc; i++) {
        curve_run *r = &runs[i];
        snprintf(r->id, sizeof r->id, "%s", ids[i]);
        char *q = rundb_quote(ids[i]);
        char **one = NULL;
        snprintf(sql, sizeof sql, "SELECT COALESCE(name, id) FROM runs WHERE id = %s", q);
        rundb_query(db, sql, collect_text, &one, err);
        snprintf(r->name, sizeof r->name, "%s", one ? one[0] : ids[i]);
        free_list(one), one = NULL;
        snprintf(sql, sizeof sql, "SELECT COALESCE(trace_path, '') FROM runs WHERE id = %s", q);
        rundb_query(db, sql, collect_text, &one, err);
        snprintf(r->trace, sizeof r->trace, "%s", one ? one[0] : "");
        free_list(one);
        fill_ctx c = {r, 0};
        snprintf(sql, sizeof sql, "SELECT key, value FROM params WHERE run = %s AND key NOT LIKE 'run.%%'", q);
        rc = rundb_query(db, sql, fill_cb, &c, err);
        const int is_loss = !strcmp(a->kind, "loss");
        if (!rc && (is_loss || a->layer < 0)) {
            c.what = 1;
            snprintf(sql, sizeof sql, "SELECT step, value FROM metrics WHERE run = %s AND key = '%s' ORDER BY step", q,
                     is_loss ? "loss" : "maxvio");
            rc = rundb_query(db, sql, fill_cb, &c, err);
            c.what = 2;
            snprintf(sql, sizeof sql, "SELECT step, value FROM metrics WHERE run = %s AND key = '%s' ORDER BY step", q,
                     is_loss ? "val_loss" : "val_maxvio");
            if (!rc) rc = rundb_query(db, sql, fill_cb, &c, err);
            /* rows added for validation-only steps: put them in step order */
            for (int j = 1; j < r->s.n; j++)
                if (r->s.x[j] < r->s.x[j - 1]) {
                    double *tmp = malloc(sizeof(double) * 3 * r->s.n);
                    for (int k = 0; k < r->s.n; k++) tmp[3 * k] = r->s.x[k], tmp[3 * k + 1] = r->s.y[k], tmp[3 * k + 2] = r->s.v[k];
                    qsort(tmp, (size_t)r->s.n, 3 * sizeof(double), cmp_x);
                    for (int k = 0; k < r->s.n; k++) r->s.x[k] = tmp[3 * k], r->s.y[k] = tmp[3 * k + 1], r->s.v[k] = tmp[3 * k + 2];
                    free(tmp);
                    break;
                }
        } else if (!rc) {
            if ((!r->trace[0] || access(r->trace, R_OK)) && !a->runs)
                continue; /* a run of the experiment that has not started: left out */
            if (!r->trace[0] || access(r->trace, R_OK))
                rc = ml_errf(err, ML_EINPUT, "run %s: no trace to read layer %d from", r->id, a->layer);
            else {
                int m;
                free(r->s.x), free(r->s.y), free(r->s.v);
                rc = plotdata_layer_maxvio(r->trace, a->layer, MAX_BINS, &r->s.x, &r->s.y, &r->s.v, &m, err);
                r->s.n = r->s.cap = rc ? 0 : m;
                if (rc) ml_err_prefix(err, "run %s", r->id);
            }
        }
        free(q);
        if (!rc && r->s.n == 0 && a->runs)
            rc = ml_errf(err, ML_EINPUT, "run %s: no %s metrics recorded", r->id, is_loss ? "loss" : "maxvio");
    }
    free_list(ids);
    rundb_close(db);
    int kept = 0;
    for (int i = 0; i < n && !rc; i++) {
        if (runs[i].s.n == 0) { /* not started yet: nothing to draw */
            for (int j = 0; j < runs[i].nparams; j++) free(runs[i].keys[j]), free(runs[i].values[j]);
            free(runs[i].keys), free(runs[i].values), series_free(&runs[i].s);
            continue;
        }
        runs[kept++] = runs[i];
    }
    if (!rc) {
        n = kept;
        if (!kept) rc = ml_errf(err, ML_EINPUT, "experiment %s: no run has recorded %s yet", a->experiment,
                                !strcmp(a->kind, "loss") ? "losses" : "MaxVio");
    }
    *out = runs, *nout = rc ? 0 : n;
    if (rc && runs) {
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < runs[i].nparams; j++) free(runs[i].keys[j]), free(runs[i].values[j]);
            free(runs[i].keys), free(runs[i].values), series_free(&runs[i].s);
        }
        free(runs);
        *out = NULL;
    }
    return rc;
}

/* Legends: "key=value ..." over the config keys whose values differ between the runs (at most 4). */
static void legend_of(const curve_run *runs, int n, int i, char *buf, size_t cap) {
    size_t len = 0;
    int shown = 0;
    buf[0] = 0;
    for (int k = 0; k < runs[i].nparams && shown < 4; k++) {
        const char *key = runs[i].keys[k];
        int differs = 0;
        for (int j = 0; j < n && !differs; j++) {
            const char *v = param(&runs[j], key);
            differs = !v || strcmp(v, runs[i].values[k]);
        }
        if (!differs) continue;
        len += (size_t)snprintf(buf + len, len < cap ? cap - len : 0, "%s%s=%s", shown ? " " : "", short_key(key),
                                runs[i].values[k]);
        shown++;
    }
    if (!shown) snprintf(buf, cap, "%s", runs[i].name);
}

static void write_block(FILE *f, const series *s, const char *legend) {
    fprintf(f, "# %s\n# step value val\n", legend);
    for (int i = 0; i < s->n; i++) fprintf(f, "%.10g %.6g %.6g\n", s->x[i], s->y[i], s->v[i]);
    fprintf(f, "\n\n");
}

/* Mean of the runs' series at every step any of them has (each value over the runs that have it). */
static void average(curve_run *runs, const int *members, int m, series *out) {
    series all = {0};
    for (int j = 0; j < m; j++)
        for (int i = 0; i < runs[members[j]].s.n; i++) series_put(&all, runs[members[j]].s.x[i], 0, 0);
    qsort(all.x, (size_t)all.n, sizeof(double), cmp_x);
    for (int i = 0; i < all.n; i++) {
        if (i && all.x[i] == all.x[i - 1]) continue;
        double sy = 0, sv = 0;
        int ny = 0, nv = 0;
        for (int j = 0; j < m; j++) {
            const series *s = &runs[members[j]].s;
            for (int k = 0; k < s->n; k++)
                if (s->x[k] == all.x[i]) {
                    if (!isnan(s->y[k])) sy += s->y[k], ny++;
                    if (!isnan(s->v[k])) sv += s->v[k], nv++;
                }
        }
        series_put(out, all.x[i], ny ? sy / ny : NAN, nv ? sv / nv : NAN);
    }
    series_free(&all);
}

static int curves_data(const plot_args *a, FILE *data, FILE *vars, ml_err *err) {
    curve_run *runs = NULL;
    int n = 0;
    int rc = load_runs(a, &runs, &n, err);
    if (rc) return rc;
    int nblocks = 0;
    char legends[MAX_SERIES][256];
    if (a->group_by) {
        int found = 0;
        for (int i = 0; i < n && !found; i++) found = param(&runs[i], a->group_by) != NULL;
        if (!found) rc = ml_errf(err, ML_EINPUT, "--group-by %s: no run has that config key", a->group_by);
        int *done = calloc((size_t)n, sizeof(int)), *members = malloc(sizeof(int) * n);
        for (int i = 0; i < n && !rc; i++) {
            if (done[i]) continue;
            const char *v = param(&runs[i], a->group_by);
            int m = 0;
            for (int j = i; j < n; j++) {
                const char *w = param(&runs[j], a->group_by);
                if (!done[j] && ((!v && !w) || (v && w && !strcmp(v, w)))) members[m++] = j, done[j] = 1;
            }
            if (nblocks == MAX_SERIES) {
                rc = ml_errf(err, ML_EINPUT, "--group-by %s: more than %d groups", a->group_by, MAX_SERIES);
                break;
            }
            series avg = {0};
            average(runs, members, m, &avg);
            snprintf(legends[nblocks], sizeof legends[0], "%s=%s (%d run%s)", short_key(a->group_by), v ? v : "-", m,
                     m == 1 ? "" : "s");
            write_block(data, &avg, legends[nblocks]);
            series_free(&avg);
            nblocks++;
        }
        free(done), free(members);
    } else {
        if (n > MAX_SERIES) rc = ml_errf(err, ML_EINPUT, "%d runs: at most %d curves (use --group-by)", n, MAX_SERIES);
        for (int i = 0; i < n && !rc; i++) {
            legend_of(runs, n, i, legends[nblocks], sizeof legends[0]);
            write_block(data, &runs[i].s, legends[nblocks]);
            nblocks++;
        }
    }
    if (!rc) {
        fprintf(vars, "n=%d; array T[%d]; ", nblocks, nblocks);
        for (int i = 0; i < nblocks; i++) {
            char name[16];
            snprintf(name, sizeof name, "T[%d]", i + 1);
            set_str(vars, name, legends[i]);
        }
        const int loss = !strcmp(a->kind, "loss");
        set_str(vars, "ylabel_text",
                loss ? "cross-entropy loss (nats)"
                     : a->layer >= 0 ? "MaxVio = (max load - mean) / mean" : "MaxVio of the worst layer");
        fprintf(vars, "has_val=1; logy=0; ");
    }
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < runs[i].nparams; j++) free(runs[i].keys[j]), free(runs[i].values[j]);
        free(runs[i].keys), free(runs[i].values), series_free(&runs[i].s);
    }
    free(runs);
    return rc;
}

/* ---- the figure kinds ---- */

static int trace_data(const plot_args *a, FILE *data, FILE *vars, char *title, size_t tcap, const char **script,
                      ml_err *err) {
    trace_window w;
    int layers[ML_MAX_LAYERS], nl = 0, rc;
    if (a->layers && (nl = parse_int_list(a->layers, layers, ML_MAX_LAYERS, err)) < 0) return nl;
    const int is_heat = !strcmp(a->kind, "heatmap"), is_dev = !strcmp(a->kind, "deviation");
    const int tail = (is_dev && !a->over_training) || !strcmp(a->kind, "fp");
    if (is_heat && a->layer < 0 && !a->step && !a->window)
        return ml_errf(err, ML_EINPUT, "plot heatmap: give --layer L (experts x steps), or --step S / --window A:B "
                                       "(layers x experts)");
    if (!strcmp(a->kind, "fp") && !nl) return ml_errf(err, ML_EINPUT, "plot fp: give --layers, e.g. --layers 0,3");
    if (is_dev && a->over_training && !nl)
        return ml_errf(err, ML_EINPUT, "plot deviation --over-training: give --layers, e.g. --layers 0,3");
    if ((rc = open_trace(a, &w, tail, err))) return rc;
    char win[96];
    window_text(&w, win, sizeof win);
    double zmax = 0;
    if (is_heat) {
        *script = "heatmap.gp";
        if (a->layer >= 0) {
            rc = plotdata_heatmap_layer(w.path, a->layer, w.r0, w.r1, a->log, MAX_BINS, data, &zmax, err);
            snprintf(title, tcap, "%s: layer %d, expert load over training", w.info.run_id, a->layer);
            fprintf(vars, "mode='steps'; ");
            set_str(vars, "xlabel_text", "step"), set_str(vars, "ylabel_text", "expert");
        } else {
            rc = plotdata_heatmap_layers(w.path, w.r0, w.r1, a->log, data, &zmax, err);
            snprintf(title, tcap, "%s: expert load per layer, %s", w.info.run_id, win);
            fprintf(vars, "mode='layers'; ");
            set_str(vars, "xlabel_text", "expert"), set_str(vars, "ylabel_text", "layer");
        }
        double cbmax = a->log ? fmin(fmax(1, ceil(zmax)), PLOT_LOG_FLOOR) : fmin(fmax(2, ceil(zmax * 2) / 2), 8);
        fprintf(vars, "logscale=%d; cbmax=%g; ", a->log, cbmax);
    } else if (is_dev) {
        *script = "deviation.gp";
        if (a->over_training) {
            rc = plotdata_deviation_training(w.path, layers, nl, w.r0, w.r1, MAX_BINS, data, err);
            fprintf(vars, "mode='training'; n=%d; array T[%d]; ", nl, nl);
            for (int i = 0; i < nl; i++) fprintf(vars, "T[%d]='layer %d'; ", i + 1, layers[i]);
            snprintf(title, tcap, "%s: min/max expert load vs uniform over training", w.info.run_id);
        } else {
            rc = plotdata_deviation_layers(w.path, w.r0, w.r1, data, err);
            fprintf(vars, "mode='layers'; ");
            snprintf(title, tcap, "%s: min/max expert load vs uniform per layer, %s", w.info.run_id, win);
        }
    } else {
        *script = "fp.gp";
        rc = plotdata_fp(w.path, layers, nl, w.r0, w.r1, data, err);
        fprintf(vars, "n=%d; array T[%d]; uniform=%.8g; ", nl, nl, 1.0 / w.info.E);
        for (int i = 0; i < nl; i++) fprintf(vars, "T[%d]='layer %d'; ", i + 1, layers[i]);
        snprintf(title, tcap, "%s: token fraction f and gate probability p per expert, %s", w.info.run_id, win);
    }
    free(w.steps);
    return rc;
}

static const char *termspec(const char *out) {
    const char *dot = strrchr(out, '.');
    if (!dot) return NULL;
    if (!strcmp(dot, ".png")) return "pngcairo size 1000,650 enhanced font 'DejaVu Sans,10'";
    if (!strcmp(dot, ".svg")) return "svg size 1000,650 dynamic enhanced font 'DejaVu Sans,10'";
    if (!strcmp(dot, ".pdf")) return "pdfcairo size 7in,4.5in enhanced font 'DejaVu Sans,9'";
    return NULL;
}

int plot_make(int argc, char **argv, ml_err *err) {
    plot_args a;
    int rc = parse_args(argc, argv, &a, err);
    if (rc) return rc;
    const char *term = termspec(a.out);
    if (!term) return ml_errf(err, ML_EINPUT, "-o %s: the figure must end in .png, .svg or .pdf", a.out);
    const char *kinds[] = {"heatmap", "deviation", "fp", "loss", "maxvio", NULL};
    int k = 0;
    while (kinds[k] && strcmp(kinds[k], a.kind)) k++;
    if (!kinds[k]) return ml_errf(err, ML_EINPUT, "unknown figure '%s' (heatmap, deviation, fp, loss, maxvio)", a.kind);
    const int curves = k >= 3;
    if (curves && a.run) return ml_errf(err, ML_EINPUT, "plot %s takes --runs A,B,... or --experiment X", a.kind);
    if (!curves && (a.runs || a.experiment)) return ml_errf(err, ML_EINPUT, "plot %s takes one --run", a.kind);

    char data_path[1100], data_tmp[1200], out_tmp[1200], title[512] = "";
    if (a.data) snprintf(data_path, sizeof data_path, "%s", a.data);
    else snprintf(data_path, sizeof data_path, "%.*s.dat", (int)(strrchr(a.out, '.') - a.out), a.out);
    snprintf(data_tmp, sizeof data_tmp, "%s.partial", data_path);
    snprintf(out_tmp, sizeof out_tmp, "%s.partial", a.out);
    FILE *data = fopen(data_tmp, "w");
    if (!data) return ml_errf(err, ML_EINPUT, "%s: %s", data_tmp, strerror(errno));
    char *vbuf = NULL;
    size_t vlen = 0;
    FILE *vars = open_memstream(&vbuf, &vlen);
    const char *script = "curves.gp";
    if (curves) {
        rc = curves_data(&a, data, vars, err);
        if (!strcmp(a.kind, "loss")) snprintf(title, sizeof title, "loss: %s", a.experiment ? a.experiment : a.runs);
        else if (a.layer >= 0) snprintf(title, sizeof title, "MaxVio of layer %d: %s", a.layer, a.experiment ? a.experiment : a.runs);
        else snprintf(title, sizeof title, "MaxVio (worst layer): %s", a.experiment ? a.experiment : a.runs);
    } else {
        rc = trace_data(&a, data, vars, title, sizeof title, &script, err);
    }
    if (fclose(data) && !rc) rc = ml_errf(err, ML_ERUN, "%s: write failed", data_tmp);
    if (!rc) {
        char spath[1100];
        rc = plot_script_path(script, spath, sizeof spath, err);
        set_str(vars, "datafile", data_tmp), set_str(vars, "outfile", out_tmp), set_str(vars, "termspec", term);
        set_str(vars, "plottitle", a.title ? a.title : title);
        fclose(vars), vars = NULL;
        if (!rc) rc = run_gnuplot(spath, vbuf, err);
    }
    if (vars) fclose(vars);
    free(vbuf);
    if (!rc && access(out_tmp, R_OK)) rc = ml_errf(err, ML_ERUN, "gnuplot wrote no %s", out_tmp);
    if (!rc && (rename(data_tmp, data_path) || rename(out_tmp, a.out)))
        rc = ml_errf(err, ML_EINPUT, "%s: %s", a.out, strerror(errno));
    if (rc) remove(data_tmp), remove(out_tmp);
    return rc;
}

int cli_plot(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        plot_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return plot_usage(stdout), 0;
    ml_err err = {0};
    int rc = plot_make(argc, argv, &err);
    if (rc) fprintf(stderr, "moelab plot %s: %s\n", argv[1], err.msg);
    return rc == ML_OK ? 0 : rc == ML_EINPUT ? 2 : 1;
}
