/* plot.h: `moelab plot` as a function, for `moelab reproduce` to draw its figures with. */
#ifndef MOELAB_PLOT_H
#define MOELAB_PLOT_H

#include <stdio.h>

#include "err.h"
#include "resources.h"

/* argv as for `moelab plot`: argv[1] is the figure kind, options follow. */
int plot_make(int argc, char **argv, ml_err *err);

/* The path of a gnuplot script of plots/. */
static inline int plot_script_path(const char *script, char *out, size_t cap, ml_err *err) {
    char rel[128];
    snprintf(rel, sizeof rel, "plots/%s", script);
    return resource_path(rel, out, cap, err);
}

#endif
