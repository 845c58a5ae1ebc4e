/* resources.c: locating run-time files (see resources.h). */
#include "resources.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MOELAB_SOURCE_DIR
#define MOELAB_SOURCE_DIR "."
#endif

static int try(const char *root, const char *rel, char *out, size_t cap) {
    if (!root || !root[0]) return 0;
    if ((size_t)snprintf(out, cap, "%s/%s", root, rel) >= cap) return 0;
    return access(out, R_OK) == 0;
}

int resource_path(const char *rel, char *out, size_t cap, ml_err *err) {
    char exe[PATH_MAX], dir[PATH_MAX + 32];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    if (try(getenv("MOELAB_HOME"), rel, out, cap)) return 0;
    snprintf(dir, sizeof dir, "%s/..", exe);
    if (n > 0 && try(dir, rel, out, cap)) return 0;
    snprintf(dir, sizeof dir, "%s/../share/moelab", exe);
    if (n > 0 && try(dir, rel, out, cap)) return 0;
    if (try(MOELAB_SOURCE_DIR, rel, out, cap)) return 0;
    return ml_errf(err, ML_EINPUT, "%s not found (looked in $MOELAB_HOME, %s/.., %s/../share/moelab and %s)", rel, exe,
                   exe, MOELAB_SOURCE_DIR);
}

int make_dirs(const char *path) {
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return errno = ENAMETOOLONG, -1;
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(buf, 0755) && errno != EEXIST) return -1;
            *p = '/';
        }
    return mkdir(buf, 0755) && errno != EEXIST ? -1 : 0;
}
