/* main.c: the moelab binary: dispatches to the subcommands of cli.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

static const struct {
    const char *name;
    int (*run)(int, char **);
    const char *summary;
} commands[] = {
    {"train", cli_train, "train a model from a preset and key=value overrides (or resume a run)"},
    {"sweep", cli_sweep, "run every run of an experiment file (YAML): resumable, in parallel, never twice"},
    {"data", cli_data, "fetch and tokenize the default corpus, or tokenize your own text (llm.c shards)"},
    {"bench", cli_bench, "measure training tokens/s and GFLOP/s against this machine's sgemm peak"},
    {"runs", cli_runs, "list, show, compare and query runs in the run database (SQLite)"},
    {"trace", cli_trace, "per-layer imbalance summaries and CSV/JSON export of a run's load trace (HDF5)"},
    {"plot", cli_plot, "figures (gnuplot): load heatmaps, min/max deviation per layer, f/p per expert, loss, MaxVio"},
    {"reproduce", cli_reproduce, "reproduce the Sigma-MoE-Tiny load-balancing figures: sweep + report (HTML)"},
    {"plan", cli_plan, "parameters, memory and FLOPs of a config, before running it"},
};

static void usage(FILE *f) {
    fprintf(f, "moelab: a simulator and profiler for load balancing in Mixture-of-Experts language models\n\n"
               "usage: moelab <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n'moelab <command> --help' describes a command. Exit codes: 0 ok, 1 run failed, 2 bad usage or input.\n");
}

int main(int argc, char **argv) {
    /* OpenMP threads that spin while they wait starve every other process's threads: two moelab runs on two
     * cores went from 5,000 to 1,100 tokens/s each. Passive waiting costs about 5% alone and fixes that; libgomp
     * reads the policy when it loads, so set it and start again (OMP_WAIT_POLICY=active restores spinning). */
    if (!getenv("OMP_WAIT_POLICY")) {
        setenv("OMP_WAIT_POLICY", "passive", 1);
        execv("/proc/self/exe", argv); /* returns only on failure: then go on spinning */
    }
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("moelab 0.1.0\n");
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "moelab: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
