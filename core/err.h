/* err.h: errors are values. A function that can fail takes an ml_err* and returns 0 on success or
 * a negative status after writing a message that names the file, line, key or value at fault.
 * Only the CLI prints the message and picks the exit code. */
#ifndef MOELAB_ERR_H
#define MOELAB_ERR_H

#include <stddef.h>

enum {
    ML_OK = 0,
    ML_EINPUT = -2, /* bad usage, config, file or data: the CLI exits 2 */
    ML_ERUN = -1,   /* a run failed (NaN, I/O while training): the CLI exits 1 */
};

typedef struct {
    int code;
    char msg[1024];
} ml_err;

/* Formats msg into err (if err is non-NULL) and returns code. */
int ml_errf(ml_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prefixes the existing message with "ctx: " (e.g. a file name); returns err->code. */
int ml_err_prefix(ml_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
