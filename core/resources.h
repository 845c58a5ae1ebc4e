/* resources.h: files moelab reads at run time from its source tree or install prefix: the gnuplot scripts
 * (plots/) and the paper's experiment files (experiments/paper/). */
#ifndef MOELAB_RESOURCES_H
#define MOELAB_RESOURCES_H

#include <stddef.h>

#include "err.h"

/* Finds rel (e.g. "plots/heatmap.gp") under, in order: $MOELAB_HOME, the binary's folder's parent (a build
 * folder inside the source tree), <prefix>/share/moelab next to an installed binary, and the source tree
 * moelab was built from. ML_EINPUT naming the places searched when it is in none. */
int resource_path(const char *rel, char *out, size_t cap, ml_err *err);

/* mkdir -p: creates path and its missing parents (0755). 0, or -1 with errno set. */
int make_dirs(const char *path);

#endif
