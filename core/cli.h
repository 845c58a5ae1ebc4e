/* cli.h: the subcommands of the one moelab binary. Each takes the arguments after its name and returns
 * the process exit code: 0 ok, 1 run failed, 2 bad usage or input. */
#ifndef MOELAB_CLI_H
#define MOELAB_CLI_H

int cli_train(int argc, char **argv);
int cli_data(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_plan(int argc, char **argv);
int cli_runs(int argc, char **argv);
int cli_trace(int argc, char **argv);
int cli_sweep(int argc, char **argv);
int cli_plot(int argc, char **argv);
int cli_reproduce(int argc, char **argv);

#include <stddef.h>

#include "err.h"

/* A run given on the command line as a trace file, a run folder or a run id in the database at db_path:
 * writes the trace's path to out. */
int cli_resolve_trace(const char *run, const char *db_path, char *out, size_t cap, ml_err *err);

#endif
