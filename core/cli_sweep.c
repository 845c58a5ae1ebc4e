/* cli_sweep.c: `moelab sweep FILE`: expand an experiment file and run (or, with --dry-run, list) its runs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "experiment.h"
#include "sweep.h"
#include "table.h"

static void sweep_usage(FILE *f) {
    fprintf(f,
            "usage: moelab sweep FILE.yaml [key=value ...] [--jobs N] [--gpus LIST] [--db PATH] [--runs-dir DIR]\n"
            "                    [--retry-failed] [--dry-run [--format table|csv|json]]\n\n"
            "Runs every run an experiment file describes (base config, sweep axes, variants, seeds; see\n"
            "experiments/README.md), each in its own worker process with its own folder (DIR/<run id>: config.yaml,\n"
            "log.txt, trace.h5, checkpoint.bin) and database row. key=value overrides apply to every run.\n\n"
            "Run it again to continue: finished runs are skipped (a run is identified by its resolved config),\n"
            "interrupted ones resume from their checkpoint, failed ones run again only with --retry-failed, and\n"
            "runs an edited file adds are appended. Ctrl-C stops the workers cleanly (checkpoints kept).\n\n"
            "  --jobs N         worker processes on the CPU (default 1); threads are shared out between them\n"
            "  --gpus LIST      one worker per listed GPU, e.g. 0,1,2,3 (needs the CUDA backend)\n"
            "  --db PATH        run database (default: run.db of the file, runs.db)\n"
            "  --runs-dir DIR   where run folders go (default runs)\n"
            "  --retry-failed   run failed runs again\n"
            "  --dry-run        list the expanded runs and what a sweep would do with each, then stop\n");
}

static const char *action(const ml_run_state *st, int retry_failed) {
    if (!strcmp(st->status, "new")) return "run";
    if (!strcmp(st->status, "finished")) return "skip (finished)";
    if (!strcmp(st->status, "failed")) return retry_failed ? (st->has_checkpoint ? "retry (resume)" : "retry") : "skip (failed)";
    if (!strcmp(st->status, "running")) return "wait (running elsewhere)";
    return st->has_checkpoint ? "resume" : "run";
}

static int dry_run(const ml_experiment *x, const char *db, int retry_failed, int format) {
    ml_run_state *state = calloc((size_t)x->nruns, sizeof *state);
    ml_err err = {0};
    if (!state || sweep_plan(x, db, state, &err)) {
        fprintf(stderr, "moelab sweep: %s\n", state ? err.msg : "out of memory");
        free(state);
        return 2;
    }
    const char *names[] = {"#", "run", "status", "action", "id"};
    ml_table t;
    table_init(&t, 5, names);
    for (int i = 0; i < x->nruns; i++)
        table_addf(&t, "%d\t%s\t%s\t%s\t%s", i + 1, x->runs[i].name, state[i].status, action(&state[i], retry_failed),
                   state[i].id);
    if (format == TABLE_TEXT) {
        int grid = 1, crossed = 0;
        for (int a = 0; a < x->naxes; a++) grid *= x->axes[a].values.n;
        for (int v = 0; v < x->nvariants; v++) crossed += x->variants[v].cross;
        printf("experiment %s (%s): %d run%s", x->name, x->path, x->nruns, x->nruns == 1 ? "" : "s");
        if (x->nvariants && !x->naxes)
            printf(" = %d variant%s", x->nvariants, x->nvariants == 1 ? "" : "s");
        else if (x->nvariants)
            printf(" = %d variant%s crossed with %d sweep point%s + %d alone", crossed, crossed == 1 ? "" : "s", grid,
                   grid == 1 ? "" : "s", x->nvariants - crossed);
        else if (x->naxes)
            printf(" = %d sweep point%s", grid, grid == 1 ? "" : "s");
        if (x->nseeds) printf(", x %d seed%s", x->nseeds, x->nseeds == 1 ? "" : "s");
        printf("\n");
    }
    table_print(&t, format, stdout);
    table_free(&t);
    free(state);
    return 0;
}

int cli_sweep(int argc, char **argv) {
    const char *file = NULL, *db = NULL, *runs_dir = "runs", *gpus = NULL, *format_name = "table";
    int jobs = 1, retry_failed = 0, dry = 0;
    char **overrides = calloc((size_t)argc + 1, sizeof *overrides);
    int noverrides = 0, rc = 0;
    for (int i = 1; i < argc && !rc; i++) {
        const char *a = argv[i];
        const int has_value = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            sweep_usage(stdout);
            free(overrides);
            return 0;
        } else if (!strcmp(a, "--jobs") && has_value) {
            char *end;
            jobs = (int)strtol(argv[++i], &end, 10);
            if (*end || jobs < 1 || jobs > 1024) {
                fprintf(stderr, "moelab sweep: --jobs: '%s' is not a number of workers in [1, 1024]\n", argv[i]);
                rc = 2;
            }
        } else if (!strcmp(a, "--gpus") && has_value) gpus = argv[++i];
        else if (!strcmp(a, "--db") && has_value) db = argv[++i];
        else if (!strcmp(a, "--runs-dir") && has_value) runs_dir = argv[++i];
        else if (!strcmp(a, "--format") && has_value) format_name = argv[++i];
        else if (!strcmp(a, "--retry-failed")) retry_failed = 1;
        else if (!strcmp(a, "--dry-run")) dry = 1;
        else if (a[0] == '-') {
            fprintf(stderr, "moelab sweep: unknown option or missing value: '%s' (see moelab sweep --help)\n", a);
            rc = 2;
        } else if (strchr(a, '=')) overrides[noverrides++] = argv[i];
        else if (!file) file = a;
        else {
            fprintf(stderr, "moelab sweep: one experiment file at a time ('%s' and '%s')\n", file, a);
            rc = 2;
        }
    }
    const int format = table_format_parse(format_name);
    if (!rc && format < 0) {
        fprintf(stderr, "moelab sweep: --format: '%s' is not table, csv or json\n", format_name);
        rc = 2;
    }
    if (!rc && !file) {
        sweep_usage(stderr);
        rc = 2;
    }
    if (rc) {
        free(overrides);
        return rc;
    }
    ml_experiment x;
    ml_err err = {0};
    if (experiment_load(&x, file, noverrides, overrides, runs_dir, &err)) {
        fprintf(stderr, "moelab sweep: %s\n", err.msg);
        free(overrides);
        return 2;
    }
    free(overrides);
    if (dry) {
        rc = dry_run(&x, db ? db : x.runs[0].cfg.run.db, retry_failed, format);
    } else {
        ml_sweep_opts o = {.db_path = db, .jobs = jobs, .gpus = gpus, .retry_failed = retry_failed, .out = stdout};
        int s = sweep_run(&x, &o, &err);
        if (s) fprintf(stderr, "moelab sweep: %s\n", err.msg);
        rc = s == ML_OK ? 0 : s == ML_EINPUT ? 2 : 1;
    }
    experiment_free(&x);
    return rc;
}
