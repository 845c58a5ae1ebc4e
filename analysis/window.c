/* window.c: step windows over a trace (see window.h). */
#include "window.h"

#include <stdlib.h>
#include <string.h>

int window_parse(const char *s, int64_t *a, int64_t *b) {
    char *end;
    const char *colon = strchr(s, ':');
    if (!colon) {
        *a = *b = strtoll(s, &end, 10);
        return end == s || *end ? -1 : 0;
    }
    *a = colon == s ? INT64_MIN : strtoll(s, &end, 10);
    if (colon != s && end != colon) return -1;
    *b = colon[1] ? strtoll(colon + 1, &end, 10) : INT64_MAX;
    if (colon[1] && *end) return -1;
    return 0;
}

int window_rows(const char *path, const ml_trace_info *info, const char *spec, const char *what, int64_t *r0,
                int64_t *r1, int64_t **step_out, ml_err *err) {
    int64_t a = INT64_MIN, b = INT64_MAX;
    if (spec && window_parse(spec, &a, &b))
        return ml_errf(err, ML_EINPUT, "%s: '%s' is not A:B (either side may be empty) or a step", what, spec);
    int64_t *st = malloc(sizeof(int64_t) * (info->nsteps ? info->nsteps : 1));
    if (!st) return ml_errf(err, ML_ERUN, "out of memory");
    int rc = info->nsteps ? trace_read_i64(path, "step", 0, info->nsteps, st, err) : 0;
    if (rc) return free(st), rc;
    *r0 = 0;
    while (*r0 < info->nsteps && st[*r0] < a) (*r0)++;
    *r1 = *r0;
    while (*r1 < info->nsteps && st[*r1] <= b) (*r1)++;
    *step_out = st;
    return ML_OK;
}
