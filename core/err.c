/* err.c: formatting of ml_err messages. */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int ml_errf(ml_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int ml_err_prefix(ml_err *err, const char *fmt, ...) {
    if (!err) return ML_EINPUT;
    char prefix[512], old[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    snprintf(err->msg, sizeof err->msg, "%.400s: %.600s", prefix, old);
    return err->code;
}
