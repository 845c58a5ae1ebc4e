/* window.h: a window of training steps ("A:B", inclusive; either side may be empty) resolved to the rows of
 * a trace that hold those steps. Shared by `moelab trace` and `moelab plot`. */
#ifndef MOELAB_WINDOW_H
#define MOELAB_WINDOW_H

#include <stdint.h>

#include "err.h"
#include "trace.h"

/* Parses "A:B" or a single step "S" (= S:S). Returns 0, or -1 when it is neither. */
int window_parse(const char *spec, int64_t *a, int64_t *b);

/* Rows [r0, r1) of the trace at path whose step lies in spec (NULL = every row). *steps receives every
 * row's step (malloc'd, info->nsteps entries). A malformed spec is ML_EINPUT naming `what` (the option). */
int window_rows(const char *path, const ml_trace_info *info, const char *spec, const char *what, int64_t *r0,
                int64_t *r1, int64_t **steps, ml_err *err);

#endif
