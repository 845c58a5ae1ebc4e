/* experiment.h: experiment files (YAML, read with libyaml) and their expansion into runs.
 *
 *   name: lbl-coef                 # experiment name (default: the file's name); [A-Za-z0-9._-]
 *   description: LBL strength vs lower-layer collapse
 *   base:                          # the config every run starts from: preset + dotted keys,
 *     preset: small-cpu            #   nested mappings allowed (balance: {policy: aux_loss})
 *     train.steps: 1000
 *   sweep:                         # axes: the cartesian product of their value lists
 *     balance.aux_coef: [1e-3, 1e-2, 1e-1]
 *   variants:                      # named sets of overrides; each is crossed with the sweep,
 *     aux: {balance.policy: aux_loss}
 *     loss_free:                   #   or stands alone (one run per seed) with cross: false
 *       cross: false
 *       balance.policy: loss_free
 *   seeds: [1, 2, 3]               # or a count N = seeds 1..N; crossed with everything
 *
 * Keys are the config keys of `moelab train key=value` (config.h). Everything is checked before a run starts:
 * errors read "file:line: key: what is wrong" (ML_EINPUT). A run's config is, in order: its preset (the last
 * of base, variant, axis, command line to name one; default tiny), then base, variant, axis values, seed and
 * the command-line overrides. A crossed variant may not set a swept key. */
#ifndef MOELAB_EXPERIMENT_H
#define MOELAB_EXPERIMENT_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "err.h"

#define ML_MAX_RUNS 10000

/* One key = value, and the line it came from (0 = the command line). */
typedef struct {
    char key[128];
    char *value;
    int line;
} ml_override;

typedef struct {
    int n, cap;
    ml_override *items;
} ml_overrides;

typedef struct {
    char name[64];
    int cross; /* crossed with the sweep (1) or alone (0) */
    int line;
    ml_overrides set;
} ml_variant;

typedef struct {
    char key[128];
    char label[128]; /* the key as run names show it: its last component unless two axes share that */
    int line;
    ml_overrides values; /* key = axis key, one per value */
} ml_axis;

typedef struct {
    char name[128];  /* unique in the experiment: "variant,label=value,...,seed=N" ("run" when nothing varies) */
    char id[128];    /* <experiment>-<name>-<hash prefix>; commas as '.', other characters outside [A-Za-z0-9._=+-] as '_' */
    char hash[17];   /* rundb_run_hash(&cfg): the run's identity */
    int variant;     /* index into variants, -1 = none */
    int *axis_index; /* per axis: the index of this run's value, -1 when its variant stands alone */
    uint64_t seed;
    int line;        /* the line that distinguishes this run (for error messages) */
    ml_config cfg;   /* resolved and validated; run.experiment, run.id, run.name and run.dir set */
} ml_run_spec;

typedef struct {
    char path[1024];
    char name[64];
    char *description;
    ml_overrides base, cli;
    int nvariants, naxes, nseeds, nruns;
    ml_variant *variants;
    ml_axis *axes;
    uint64_t *seeds;
    int seeds_line;
    ml_run_spec *runs;
} ml_experiment;

/* Reads, checks and expands the experiment file at path. overrides ("key=value", may be NULL when n is 0) apply
 * to every run after the file's keys. Run folders are runs_dir/<id>. On error nothing is left allocated. */
int experiment_load(ml_experiment *x, const char *path, int noverrides, char *const *overrides, const char *runs_dir,
                    ml_err *err);

/* The same from text in memory (len bytes, need not be NUL-terminated); path is only used in messages. */
int experiment_parse(ml_experiment *x, const char *text, size_t len, const char *path, int noverrides,
                     char *const *overrides, const char *runs_dir, ml_err *err);

void experiment_free(ml_experiment *x);

/* The value a run got for axis a (its text as written), or NULL when the run's variant stands alone. */
const char *experiment_axis_value(const ml_experiment *x, int run, int a);

#endif
