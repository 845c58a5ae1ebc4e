/* sweep.h: runs every run of an experiment, each in its own worker process, and survives interruptions.
 *
 * The run database is the source of truth. A run is identified by (experiment, hash of its resolved config
 * without run.*), so invoking a sweep again skips finished runs, resumes killed or queued ones from their
 * checkpoint, re-runs failed ones only when asked, and adds only the runs an edited file introduces. Workers
 * claim a run with one atomic UPDATE (rundb_claim), so two sweeps over one database never run a run twice.
 * Worker processes are forked (the parent holds no database, HDF5 or OpenMP state when it forks); they die
 * with the runner (PR_SET_PDEATHSIG), checkpointing and marking their run killed on the way out. */
#ifndef MOELAB_SWEEP_H
#define MOELAB_SWEEP_H

#include <stdio.h>

#include "err.h"
#include "experiment.h"

typedef struct {
    const char *db_path;  /* NULL = the runs' run.db */
    int jobs;             /* worker processes on the CPU (>= 1) */
    const char *gpus;     /* "0,1,3": one worker per GPU (CUDA_VISIBLE_DEVICES); NULL = CPU */
    int retry_failed;
    FILE *out;            /* progress and summary (stdout by default) */
} ml_sweep_opts;

/* Where a run of the experiment stands in the database, for --dry-run: "new", "finished", "failed",
 * "queued", "killed", "running"; plus whether its folder holds a checkpoint to resume from. */
typedef struct {
    char status[16];
    int has_checkpoint;
    char id[128];
    char run_dir[512];
} ml_run_state;

/* Fills state[i] for every run of x (the database need not exist: then every run is new). */
int sweep_plan(const ml_experiment *x, const char *db_path, ml_run_state *state, ml_err *err);

/* Runs the experiment to completion. ML_OK when every run finished; ML_ERUN when a run failed or the sweep
 * was interrupted (what was done is kept); ML_EINPUT for bad input (missing data, unusable database) before
 * any run starts. */
int sweep_run(const ml_experiment *x, const ml_sweep_opts *opts, ml_err *err);

#endif
