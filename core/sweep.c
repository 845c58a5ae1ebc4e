/* sweep.c: the sweep runner (see sweep.h): database bookkeeping, worker processes, progress and summary. */
#include "sweep.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "dataloader.h"
#include "resources.h"
#include "rundb.h"
#include "table.h"
#include "train.h"

#define REAP_STALE_S 600
#define RECHECK_S 2.0     /* how often runs held by other processes are looked at again */
#define PLAIN_EVERY_S 30.0 /* progress lines per run when the output is not a terminal */

enum { MSG_PROGRESS = 1, MSG_ERROR = 2 };

/* One record on a worker's pipe: written whole (smaller than PIPE_BUF, so writes are atomic). */
typedef struct {
    int kind;
    ml_train_progress p;
    char msg[512];
} worker_msg;
_Static_assert(sizeof(worker_msg) <= 4096, "worker messages must be atomic pipe writes");

enum run_state { PENDING, ACTIVE, HELD, FINISHED, FAILED, KILLED };

typedef struct {
    pid_t pid;      /* 0 = free slot */
    int run;
    int fd;
    int resumed;
    double started, last_plain;
    int have_progress;
    ml_train_progress p;
    char error[512];
    char gpu[16];
} slot;

typedef struct {
    const ml_experiment *x;
    const ml_sweep_opts *o;
    FILE *out;
    int tty;
    char db[512];
    ml_run_ref *ref;   /* per run: its id, status and folder in the database */
    int *state;        /* enum run_state per run */
    slot *slots;
    int nslots, threads;
    int stopping;
    int drawn;         /* progress lines on screen (terminal) */
    double t0, last_recheck, last_draw;
} sweeper;

static volatile sig_atomic_t stop_requests;
static void on_stop(int sig) {
    (void)sig;
    stop_requests++;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}


static int has_checkpoint(const char *dir) {
    char path[600];
    snprintf(path, sizeof path, "%s/checkpoint.bin", dir);
    return access(path, R_OK) == 0;
}

static const char *db_path_of(const ml_experiment *x, const ml_sweep_opts *o) {
    if (o && o->db_path && o->db_path[0]) return o->db_path;
    return x->nruns ? x->runs[0].cfg.run.db : "";
}

/* ---- small typed reads over rundb_query ---- */

typedef struct {
    char status[16];
    char error[512];
    int found;
} status_row;

static int status_cb(void *ctx, int ncol, char **names, char **values) {
    (void)names;
    status_row *r = ctx;
    r->found = 1;
    snprintf(r->status, sizeof r->status, "%s", ncol > 0 && values[0] ? values[0] : "");
    snprintf(r->error, sizeof r->error, "%s", ncol > 1 && values[1] ? values[1] : "");
    return 1;
}

static int read_status(ml_rundb *db, const char *id, status_row *r, ml_err *err) {
    char sql[400], *q = rundb_quote(id);
    memset(r, 0, sizeof *r);
    snprintf(sql, sizeof sql, "SELECT status, error FROM runs WHERE id = %s", q);
    free(q);
    return rundb_query(db, sql, status_cb, r, err);
}

/* ---- the database side ---- */

static void config_text(const ml_config *cfg, char **text) {
    size_t len = 0;
    *text = NULL;
    FILE *f = open_memstream(text, &len);
    if (f) {
        config_write(cfg, f);
        fclose(f);
    }
}

int sweep_plan(const ml_experiment *x, const char *db_path, ml_run_state *state, ml_err *err) {
    for (int i = 0; i < x->nruns; i++) {
        snprintf(state[i].status, sizeof state[i].status, "new");
        snprintf(state[i].id, sizeof state[i].id, "%s", x->runs[i].id);
        snprintf(state[i].run_dir, sizeof state[i].run_dir, "%s", x->runs[i].cfg.run.dir);
        state[i].has_checkpoint = 0;
    }
    if (!db_path || !db_path[0] || access(db_path, F_OK)) return ML_OK;
    ml_rundb *db;
    int rc = rundb_open(&db, db_path, 1, err);
    for (int i = 0; i < x->nruns && !rc; i++) {
        ml_run_ref ref;
        int found = rundb_find_run(db, x->name, x->runs[i].hash, &ref, err);
        if (found < 0) rc = found;
        if (found == 1) {
            snprintf(state[i].status, sizeof state[i].status, "%s", ref.status);
            snprintf(state[i].id, sizeof state[i].id, "%s", ref.id);
            if (ref.run_dir[0]) snprintf(state[i].run_dir, sizeof state[i].run_dir, "%s", ref.run_dir);
            state[i].has_checkpoint = has_checkpoint(state[i].run_dir);
        }
    }
    if (db) rundb_close(db);
    return rc;
}

/* Records the experiment and its new runs (queued) and learns each run's id, status and folder. */
static int sync_runs(sweeper *s, ml_err *err) {
    const ml_experiment *x = s->x;
    ml_rundb *db;
    int rc = rundb_open(&db, s->db, 0, err);
    if (rc) return rc;
    if (rundb_reap(db, REAP_STALE_S, err) < 0) rc = err->code;
    if (!rc) rc = rundb_add_experiment(db, x->name, x->description ? x->description : "", x->path, err);
    for (int i = 0; i < x->nruns && !rc; i++) {
        const ml_run_spec *r = &x->runs[i];
        int found = rundb_find_run(db, x->name, r->hash, &s->ref[i], err);
        if (found < 0) {
            rc = found;
            break;
        }
        if (!found) {
            char *text;
            config_text(&r->cfg, &text);
            rc = rundb_add_run(db, r->id, x->name, r->name, &r->cfg, text, r->hash, r->cfg.run.dir,
                               s->o->gpus ? "cuda" : "cpu", 1, err);
            free(text);
            snprintf(s->ref[i].id, sizeof s->ref[i].id, "%s", r->id);
            snprintf(s->ref[i].status, sizeof s->ref[i].status, "queued");
            snprintf(s->ref[i].run_dir, sizeof s->ref[i].run_dir, "%s", r->cfg.run.dir);
        }
        if (!s->ref[i].run_dir[0]) snprintf(s->ref[i].run_dir, sizeof s->ref[i].run_dir, "%s", r->cfg.run.dir);
        const char *st = s->ref[i].status;
        s->state[i] = !strcmp(st, "finished") ? FINISHED
                    : !strcmp(st, "failed") && !s->o->retry_failed ? FAILED
                    : !strcmp(st, "running") ? HELD : PENDING;
    }
    rundb_close(db);
    return rc;
}

/* Every distinct data folder must hold train.bin and val.bin that fit the runs reading them. */
static int check_data(const ml_experiment *x, ml_err *err) {
    for (int i = 0; i < x->nruns; i++) {
        const ml_config *c = &x->runs[i].cfg;
        int seen = 0;
        for (int j = 0; j < i && !seen; j++) {
            const ml_config *d = &x->runs[j].cfg;
            seen = !strcmp(c->data.dir, d->data.dir) && c->model.vocab == d->model.vocab &&
                   c->train.batch == d->train.batch && c->model.seq_len == d->model.seq_len;
        }
        if (seen) continue;
        const char *names[] = {"train.bin", "val.bin"};
        for (int k = 0; k < 2; k++) {
            char path[600];
            snprintf(path, sizeof path, "%s/%s", c->data.dir, names[k]);
            ml_loader l = {0};
            int rc = loader_open(&l, path, c->train.batch, c->model.seq_len, c->model.vocab, err);
            if (rc) {
                if (access(path, F_OK)) ml_err_prefix(err, "data.dir (run %s); run 'moelab data prepare' first",
                                                      x->runs[i].name);
                return rc;
            }
            loader_close(&l);
        }
    }
    return ML_OK;
}

/* ---- the worker process ---- */

static void send_msg(int fd, const worker_msg *m) {
    for (;;) {
        ssize_t w = write(fd, m, sizeof *m);
        if (w >= 0 || errno != EINTR) return;
    }
}

static void on_worker_progress(void *ctx, const ml_train_progress *p) {
    worker_msg m = {.kind = MSG_PROGRESS, .p = *p};
    send_msg(*(int *)ctx, &m); /* non-blocking: dropped when the runner lags */
}

__attribute__((noreturn)) static void worker(const sweeper *s, int run, const slot *sl, int wfd, pid_t parent) {
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* the runner died: checkpoint, mark killed, exit */
    if (getppid() != parent) _exit(1);
    signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL);
    signal(SIGPIPE, SIG_IGN); /* a dead runner's pipe must not kill the worker before it checkpoints */
    const ml_run_spec *r = &s->x->runs[run];
    const char *dir = s->ref[run].run_dir;
    char path[600];
    snprintf(path, sizeof path, "%s/output.txt", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) dup2(fd, 1), dup2(fd, 2), close(fd);
    if (sl->gpu[0]) setenv("CUDA_VISIBLE_DEVICES", sl->gpu, 1);
    omp_set_num_threads(s->threads);
    fcntl(wfd, F_SETFL, fcntl(wfd, F_GETFL) | O_NONBLOCK);

    ml_config cfg = r->cfg;
    snprintf(cfg.run.id, sizeof cfg.run.id, "%s", s->ref[run].id);
    snprintf(cfg.run.dir, sizeof cfg.run.dir, "%s", dir);
    snprintf(cfg.run.db, sizeof cfg.run.db, "%s", s->db);
    cfg.run.resume[0] = 0;
    if (sl->resumed) snprintf(cfg.run.resume, sizeof cfg.run.resume, "%.490s/checkpoint.bin", dir);
    ml_train_opts o = {.quiet = 1, .on_progress = on_worker_progress, .progress_ctx = &wfd,
                       .backend = sl->gpu[0] ? "cuda" : "cpu"};
    ml_train_result res;
    ml_err err = {0};
    int rc = train_run(&cfg, &o, &res, &err);
    if (rc) {
        worker_msg m = {.kind = MSG_ERROR};
        snprintf(m.msg, sizeof m.msg, "%.500s", err.msg);
        fcntl(wfd, F_SETFL, fcntl(wfd, F_GETFL) & ~O_NONBLOCK);
        send_msg(wfd, &m);
        fprintf(stderr, "moelab sweep: run %s: %s\n", cfg.run.id, err.msg);
    }
    fflush(NULL);
    _exit(rc == ML_OK ? 0 : rc == ML_EINPUT ? 2 : 1);
}

/* ---- progress ---- */

static int count_state(const sweeper *s, int st) {
    int n = 0;
    for (int i = 0; i < s->x->nruns; i++) n += s->state[i] == st;
    return n;
}

static void erase_progress(sweeper *s) {
    if (s->tty && s->drawn) fprintf(s->out, "\033[%dA\033[J", s->drawn);
    s->drawn = 0;
}

static void progress_text(const sweeper *s, const slot *sl, char *buf, size_t n) {
    const ml_run_spec *r = &s->x->runs[sl->run];
    if (!sl->have_progress) {
        snprintf(buf, n, "%-28s %s", r->name, sl->resumed ? "resuming..." : "starting...");
        return;
    }
    char eta[32], val[24];
    train_fmt_duration(eta, sizeof eta, sl->p.eta_s);
    snprintf(val, sizeof val, isnan(sl->p.val_loss) ? "-" : "%.4f", sl->p.val_loss);
    snprintf(buf, n, "%-28s step %5d/%-5d | loss %.4f | val %s | maxvio %.2f (layer %d) | eta %s", r->name, sl->p.step,
             sl->p.steps, sl->p.loss, val, sl->p.maxvio, sl->p.worst_layer, eta);
}

static void draw_progress(sweeper *s, int force) {
    const double t = now_s();
    if (!s->tty) {
        for (int k = 0; k < s->nslots; k++) {
            slot *sl = &s->slots[k];
            if (!sl->pid || !sl->have_progress || t - sl->last_plain < PLAIN_EVERY_S) continue;
            char line[512];
            progress_text(s, sl, line, sizeof line);
            fprintf(s->out, "[%d/%d] %s\n", count_state(s, FINISHED), s->x->nruns, line);
            sl->last_plain = t;
        }
        fflush(s->out);
        return;
    }
    if (!force && t - s->last_draw < 0.25) return;
    s->last_draw = t;
    erase_progress(s);
    char el[32];
    train_fmt_duration(el, sizeof el, t - s->t0);
    const int held = count_state(s, HELD);
    fprintf(s->out, "sweep %s: %d/%d done, %d failed, %d running%s | %s%s\n", s->x->name, count_state(s, FINISHED),
            s->x->nruns, count_state(s, FAILED), count_state(s, ACTIVE), held ? ", some held by other processes" : "",
            el, s->stopping ? " | stopping (Ctrl-C again to kill)" : "");
    s->drawn = 1;
    for (int k = 0; k < s->nslots; k++) {
        if (!s->slots[k].pid) continue;
        char line[512];
        progress_text(s, &s->slots[k], line, sizeof line);
        fprintf(s->out, "  %.*s\n", 150, line);
        s->drawn++;
    }
    fflush(s->out);
}

static void event(sweeper *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void event(sweeper *s, const char *fmt, ...) {
    erase_progress(s);
    fprintf(s->out, "[%d/%d] ", count_state(s, FINISHED), s->x->nruns);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(s->out, fmt, ap);
    va_end(ap);
    fputc('\n', s->out);
    if (s->tty) draw_progress(s, 1);
    fflush(s->out);
}

/* ---- scheduling ---- */

/* Claims run i and forks its worker into slot sl. Returns 1 started, 0 not claimable now, or an error. */
static int start_run(sweeper *s, int i, slot *sl, ml_err *err) {
    ml_rundb *db;
    int rc = rundb_open(&db, s->db, 0, err);
    if (rc) return rc;
    int claimed = rundb_claim(db, s->ref[i].id, s->o->retry_failed, err);
    status_row row = {0};
    if (claimed == 0) rc = read_status(db, s->ref[i].id, &row, err);
    rundb_close(db); /* never fork with a database open: SQLite's locks do not survive fork */
    if (claimed < 0) return claimed;
    if (rc) return rc;
    if (!claimed) {
        s->state[i] = !strcmp(row.status, "finished") ? FINISHED
                    : !strcmp(row.status, "failed") ? FAILED
                    : HELD;
        return 0;
    }
    if (make_dirs(s->ref[i].run_dir)) return ml_errf(err, ML_EINPUT, "%s: %s", s->ref[i].run_dir, strerror(errno));
    int fds[2];
    if (pipe2(fds, O_CLOEXEC)) return ml_errf(err, ML_ERUN, "pipe: %s", strerror(errno));
    sl->run = i;
    sl->resumed = has_checkpoint(s->ref[i].run_dir);
    sl->have_progress = 0;
    sl->error[0] = 0;
    sl->started = now_s();
    sl->last_plain = 0;
    fflush(NULL);
    const pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]), close(fds[1]);
        return ml_errf(err, ML_ERUN, "fork: %s", strerror(errno));
    }
    if (pid == 0) {
        close(fds[0]);
        worker(s, i, sl, fds[1], parent);
    }
    close(fds[1]);
    fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    sl->pid = pid;
    sl->fd = fds[0];
    s->state[i] = ACTIVE;
    event(s, "%s %s (%s)%s%s", sl->resumed ? "resumed" : "started", s->x->runs[i].name, s->ref[i].id,
          sl->gpu[0] ? " on GPU " : "", sl->gpu);
    return 1;
}

static void read_messages(slot *sl) {
    worker_msg m;
    for (;;) {
        ssize_t n = read(sl->fd, &m, sizeof m);
        if (n != (ssize_t)sizeof m) return;
        if (m.kind == MSG_PROGRESS) sl->p = m.p, sl->have_progress = 1;
        else if (m.kind == MSG_ERROR) memcpy(sl->error, m.msg, sizeof sl->error), sl->error[sizeof sl->error - 1] = 0;
    }
}

typedef struct {
    double val_loss, maxvio;
    int has_val, has_maxvio, layer;
} run_summary;

static int summary_cb(void *ctx, int ncol, char **names, char **v) {
    (void)names;
    run_summary *r = ctx;
    if (ncol < 3) return 1;
    if (v[0]) r->val_loss = atof(v[0]), r->has_val = 1;
    if (v[1]) r->maxvio = atof(v[1]), r->has_maxvio = 1;
    if (v[2]) r->layer = atoi(v[2] + 5); /* "layerN.val_maxvio" */
    return 1;
}

static void read_summary(ml_rundb *db, const char *id, run_summary *r) {
    memset(r, 0, sizeof *r);
    r->layer = -1;
    char sql[800], *q = rundb_quote(id);
    snprintf(sql, sizeof sql,
             "SELECT (SELECT value FROM summary WHERE run = %s AND key = 'val_loss'), m.value, m.key FROM "
             "(SELECT 1) LEFT JOIN (SELECT key, value FROM summary WHERE run = %s AND key LIKE 'layer%%.val_maxvio' "
             "ORDER BY value DESC LIMIT 1) m",
             q, q);
    free(q);
    ml_err ignore;
    rundb_query(db, sql, summary_cb, r, &ignore);
}

/* A worker exited: make sure its row says how it ended, and report it. */
static void finish_run(sweeper *s, slot *sl, int wstatus) {
    read_messages(sl);
    close(sl->fd);
    const int i = sl->run;
    const char *id = s->ref[i].id;
    const ml_run_spec *r = &s->x->runs[i];
    ml_rundb *db;
    ml_err err = {0};
    status_row row = {0};
    run_summary sum = {0};
    if (rundb_open(&db, s->db, 0, &err) == ML_OK) {
        if (read_status(db, id, &row, &err) == ML_OK && (!strcmp(row.status, "running") || !strcmp(row.status, "queued"))) {
            /* it ended without recording how (it failed before training started, or crashed) */
            char why[600];
            if (WIFSIGNALED(wstatus))
                snprintf(why, sizeof why, "worker terminated by signal %d (%s)", WTERMSIG(wstatus),
                         strsignal(WTERMSIG(wstatus)));
            else
                snprintf(why, sizeof why, "%s", sl->error[0] ? sl->error : "worker exited without finishing");
            const int resumable = WIFSIGNALED(wstatus) && (WTERMSIG(wstatus) == SIGKILL || WTERMSIG(wstatus) == SIGTERM ||
                                                           WTERMSIG(wstatus) == SIGINT);
            rundb_set_status(db, id, resumable ? "killed" : "failed", why, &err);
            snprintf(row.status, sizeof row.status, "%s", resumable ? "killed" : "failed");
            snprintf(row.error, sizeof row.error, "%.500s", why);
        }
        if (!strcmp(row.status, "finished")) read_summary(db, id, &sum);
        rundb_close(db);
    } else {
        snprintf(row.status, sizeof row.status, "failed");
        snprintf(row.error, sizeof row.error, "%.500s", err.msg);
    }
    sl->pid = 0;
    char took[32];
    train_fmt_duration(took, sizeof took, now_s() - sl->started);
    if (!strcmp(row.status, "finished")) {
        s->state[i] = FINISHED;
        char val[24] = "-", mv[48] = "-";
        if (sum.has_val) snprintf(val, sizeof val, "%.4f", sum.val_loss);
        if (sum.has_maxvio) snprintf(mv, sizeof mv, "%.2f (layer %d)", sum.maxvio, sum.layer);
        event(s, "finished %s in %s: val loss %s, worst MaxVio %s", r->name, took, val, mv);
    } else if (!strcmp(row.status, "killed")) {
        s->state[i] = KILLED;
        event(s, "stopped %s after %s (resumable: run the sweep again)", r->name, took);
    } else {
        s->state[i] = FAILED;
        event(s, "FAILED %s after %s: %s (log: %s/output.txt)", r->name, took, row.error[0] ? row.error : sl->error,
              s->ref[i].run_dir);
    }
}

/* Runs held by other processes: finished, failed, or free to claim again once their process is gone. */
static void recheck_held(sweeper *s) {
    if (!count_state(s, HELD)) return;
    ml_rundb *db;
    ml_err err;
    if (rundb_open(&db, s->db, 0, &err)) return;
    rundb_reap(db, REAP_STALE_S, &err);
    for (int i = 0; i < s->x->nruns; i++) {
        if (s->state[i] != HELD) continue;
        status_row row;
        if (read_status(db, s->ref[i].id, &row, &err)) continue;
        if (!strcmp(row.status, "finished")) s->state[i] = FINISHED;
        else if (!strcmp(row.status, "failed")) s->state[i] = s->o->retry_failed ? PENDING : FAILED;
        else if (strcmp(row.status, "running")) s->state[i] = PENDING;
    }
    rundb_close(db);
}

static int parse_gpus(const char *list, char (*out)[16], int cap, ml_err *err) {
    int n = 0;
    const char *p = list;
    while (*p) {
        char *end;
        long g = strtol(p, &end, 10);
        if (end == p || g < 0 || g > 1023 || (*end && *end != ','))
            return ml_errf(err, ML_EINPUT, "--gpus: '%s' is not a list of GPU indices like 0,1,3", list);
        if (n == cap) return ml_errf(err, ML_EINPUT, "--gpus: more than %d GPUs", cap);
        snprintf(out[n++], 16, "%ld", g);
        p = *end ? end + 1 : end;
    }
    if (!n) return ml_errf(err, ML_EINPUT, "--gpus: empty list");
    return n;
}

static void print_summary(sweeper *s) {
    const ml_experiment *x = s->x;
    ml_rundb *db = NULL;
    ml_err err;
    if (rundb_open(&db, s->db, 1, &err)) db = NULL;
    const int ncol = 1 + (x->nvariants > 0) + x->naxes + (x->nseeds > 0) + 4;
    const char **names = calloc((size_t)ncol, sizeof *names);
    char **cells = calloc((size_t)ncol, sizeof *cells);
    int c = 0;
    names[c++] = "run";
    if (x->nvariants) names[c++] = "variant";
    for (int a = 0; a < x->naxes; a++) names[c++] = x->axes[a].label;
    if (x->nseeds) names[c++] = "seed";
    names[c++] = "status", names[c++] = "val_loss", names[c++] = "worst_maxvio", names[c++] = "layer";
    ml_table t;
    table_init(&t, ncol, names);
    for (int i = 0; i < x->nruns; i++) {
        const ml_run_spec *r = &x->runs[i];
        status_row row = {0};
        run_summary sum = {0};
        sum.layer = -1;
        if (db && !read_status(db, s->ref[i].id, &row, &err) && !strcmp(row.status, "finished"))
            read_summary(db, s->ref[i].id, &sum);
        c = 0;
        cells[c++] = strdup(r->name);
        if (x->nvariants) cells[c++] = strdup(x->variants[r->variant].name);
        for (int a = 0; a < x->naxes; a++) {
            const char *v = experiment_axis_value(x, i, a);
            cells[c++] = strdup(v ? v : "-");
        }
        if (x->nseeds) asprintf(&cells[c++], "%llu", (unsigned long long)r->seed);
        cells[c++] = strdup(row.found ? row.status : "?");
        if (sum.has_val) asprintf(&cells[c++], "%.4f", sum.val_loss);
        else cells[c++] = strdup("-");
        if (sum.has_maxvio) asprintf(&cells[c++], "%.3f", sum.maxvio), asprintf(&cells[c++], "%d", sum.layer);
        else cells[c++] = strdup("-"), cells[c++] = strdup("-");
        table_add(&t, (const char *const *)cells);
        for (int k = 0; k < ncol; k++) free(cells[k]);
    }
    fprintf(s->out, "\n");
    table_print(&t, TABLE_TEXT, s->out);
    table_free(&t);
    free(names), free(cells);
    if (db) rundb_close(db);
    char runs_dir[512];
    snprintf(runs_dir, sizeof runs_dir, "%s", x->nruns ? s->ref[0].run_dir : "runs");
    char *slash = strrchr(runs_dir, '/');
    if (slash) *slash = 0;
    fprintf(s->out,
            "\nworst_maxvio: the largest per-layer MaxVio of the final evaluation, and its layer.\n"
            "runs:     %s/<id>/ (config.yaml, log.txt, trace.h5, checkpoint.bin, output.txt)\n"
            "database: %s (moelab runs list --experiment %s --db %s)\n",
            runs_dir, s->db, x->name, s->db);
}

int sweep_run(const ml_experiment *x, const ml_sweep_opts *o, ml_err *err) {
    sweeper s = {.x = x, .o = o, .out = o->out ? o->out : stdout};
    s.tty = isatty(fileno(s.out));
    snprintf(s.db, sizeof s.db, "%s", db_path_of(x, o));
    if (!s.db[0]) return ml_errf(err, ML_EINPUT, "a sweep needs a run database: give --db PATH (run.db is empty)");
    char gpus[64][16];
    int ngpus = 0;
    if (o->gpus) {
        ngpus = parse_gpus(o->gpus, gpus, 64, err);
        if (ngpus < 0) return ngpus;
        const ml_backend *be;
        char why[512];
        if (backend_select("cuda", &be, why, sizeof why)) return ml_errf(err, ML_EINPUT, "--gpus: %s", why);
    }
    if (o->jobs < 1) return ml_errf(err, ML_EINPUT, "--jobs: %d must be at least 1", o->jobs);
    int rc = check_data(x, err);
    if (rc) return rc;

    s.ref = calloc((size_t)x->nruns, sizeof *s.ref);
    s.state = calloc((size_t)x->nruns, sizeof *s.state);
    s.nslots = ngpus ? ngpus : o->jobs;
    s.slots = calloc((size_t)s.nslots, sizeof *s.slots);
    if (!s.ref || !s.state || !s.slots) {
        free(s.ref), free(s.state), free(s.slots);
        return ml_errf(err, ML_ERUN, "out of memory");
    }
    for (int k = 0; k < ngpus; k++) snprintf(s.slots[k].gpu, sizeof s.slots[k].gpu, "%.15s", gpus[k]);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    s.threads = ncpu > s.nslots ? (int)(ncpu / s.nslots) : 1;

    char db_dir[512];
    snprintf(db_dir, sizeof db_dir, "%s", s.db);
    char *slash = strrchr(db_dir, '/');
    if (slash && slash != db_dir) {
        *slash = 0;
        if (make_dirs(db_dir)) {
            rc = ml_errf(err, ML_EINPUT, "%s: %s", db_dir, strerror(errno));
            goto done;
        }
    }
    if ((rc = sync_runs(&s, err))) goto done;
    const int finished_before = count_state(&s, FINISHED), failed_before = count_state(&s, FAILED);
    fprintf(s.out, "sweep %s: %d runs (%d finished before, %d failed before%s), %d worker%s, database %s\n", x->name,
            x->nruns, finished_before, failed_before, failed_before && !o->retry_failed ? ", not retried without --retry-failed" : "",
            s.nslots, s.nslots == 1 ? "" : "s", s.db);
    fflush(s.out);

    stop_requests = 0;
    struct sigaction sa = {.sa_handler = on_stop}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    s.t0 = now_s();
    int next = 0, killed_hard = 0;
    struct pollfd *pfd = calloc((size_t)s.nslots, sizeof *pfd);
    for (;;) {
        if (stop_requests && !s.stopping) {
            s.stopping = 1;
            for (int k = 0; k < s.nslots; k++)
                if (s.slots[k].pid) kill(s.slots[k].pid, SIGTERM);
            event(&s, "stopping: workers checkpoint and exit (Ctrl-C again to kill them)");
        }
        if (stop_requests >= 2 && !killed_hard) {
            killed_hard = 1;
            for (int k = 0; k < s.nslots; k++)
                if (s.slots[k].pid) kill(s.slots[k].pid, SIGKILL);
        }
        /* fill free slots with pending runs, in file order */
        for (int k = 0; k < s.nslots && !s.stopping; k++) {
            if (s.slots[k].pid) continue;
            while (next < x->nruns && s.state[next] != PENDING) next++;
            if (next == x->nruns) {
                next = 0; /* runs that became pending again (held elsewhere, now free) */
                while (next < x->nruns && s.state[next] != PENDING) next++;
                if (next == x->nruns) break;
            }
            int started = start_run(&s, next, &s.slots[k], err);
            if (started < 0) {
                rc = started;
                s.stopping = 1;
                stop_requests = stop_requests ? stop_requests : 1;
                for (int j = 0; j < s.nslots; j++)
                    if (s.slots[j].pid) kill(s.slots[j].pid, SIGTERM);
                break;
            }
            if (!started) k--; /* try the next pending run in this slot */
        }
        int active = 0;
        for (int k = 0; k < s.nslots; k++) active += s.slots[k].pid != 0;
        const int pending = count_state(&s, PENDING), held = count_state(&s, HELD);
        if (!active && (s.stopping || (!pending && !held))) break;

        int n = 0;
        for (int k = 0; k < s.nslots; k++)
            if (s.slots[k].pid) pfd[n].fd = s.slots[k].fd, pfd[n].events = POLLIN, n++;
        poll(pfd, (nfds_t)n, 200);
        for (int k = 0; k < s.nslots; k++)
            if (s.slots[k].pid) read_messages(&s.slots[k]);
        int wstatus;
        pid_t pid;
        while ((pid = waitpid(-1, &wstatus, WNOHANG)) > 0)
            for (int k = 0; k < s.nslots; k++)
                if (s.slots[k].pid == pid) finish_run(&s, &s.slots[k], wstatus);
        if (now_s() - s.last_recheck > RECHECK_S) {
            s.last_recheck = now_s();
            recheck_held(&s);
        }
        draw_progress(&s, 0);
    }
    free(pfd);
    erase_progress(&s);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    print_summary(&s);
    if (!rc) {
        const int finished = count_state(&s, FINISHED), failed = count_state(&s, FAILED);
        char el[32];
        train_fmt_duration(el, sizeof el, now_s() - s.t0);
        fprintf(s.out, "sweep %s: %d of %d runs finished, %d failed, in %s\n", x->name, finished, x->nruns, failed, el);
        if (s.stopping)
            rc = ml_errf(err, ML_ERUN, "interrupted; run the same command again to resume the unfinished runs");
        else if (failed)
            rc = ml_errf(err, ML_ERUN, "%d run%s failed (--retry-failed runs %s again)", failed, failed == 1 ? "" : "s",
                         failed == 1 ? "it" : "them");
        else if (finished < x->nruns)
            rc = ml_errf(err, ML_ERUN, "%d run%s did not finish (killed); run the same command again to resume",
                         x->nruns - finished, x->nruns - finished == 1 ? "" : "s");
    }
done:
    free(s.ref), free(s.state), free(s.slots);
    return rc;
}
