/* fuzz_experiment.c: libFuzzer target for experiment files. Every input goes through experiment_parse (the
 * same path `moelab exp` takes after reading the file); an accepted input must free cleanly, a rejected one
 * must leave a message. Build and run with tests/fuzz/run.sh.
 *
 * With -DML_FUZZ_REPLAY it is a plain program instead: every file named on the command line (a folder stands
 * for the files in it) runs through LLVMFuzzerTestOneInput once, so the corpus is a regression test under any
 * compiler's sanitizers:  fuzz_experiment_replay tests/fuzz/corpus */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "experiment.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int by_id(const void *a, const void *b) {
    return strcmp((*(const ml_run_spec *const *)a)->id, (*(const ml_run_spec *const *)b)->id);
}

/* Two runs of one experiment never share an id (the id names the run folder and the database row). */
static void check_ids_unique(const ml_experiment *x) {
    const ml_run_spec **order = malloc((size_t)x->nruns * sizeof *order);
    if (!order) return;
    for (int r = 0; r < x->nruns; r++) order[r] = &x->runs[r];
    qsort(order, (size_t)x->nruns, sizeof *order, by_id);
    for (int r = 1; r < x->nruns; r++)
        if (!strcmp(order[r - 1]->id, order[r]->id)) {
            fprintf(stderr, "fuzz_experiment: runs '%s' and '%s' share the id %s\n", order[r - 1]->name, order[r]->name,
                    order[r]->id);
            abort();
        }
    free(order);
}

/* Leading lines "#=key=value" (YAML comments, so the file means the same) are also passed as command-line
 * overrides, so the override code is fuzzed too. */
#define MAX_OV 8
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *ov[MAX_OV] = {0};
    int nov = 0;
    size_t at = 0;
    while (nov < MAX_OV && size - at >= 2 && data[at] == '#' && data[at + 1] == '=') {
        const uint8_t *nl = memchr(data + at, '\n', size - at);
        size_t end = nl ? (size_t)(nl - data) : size;
        if (!(ov[nov] = malloc(end - at - 1))) break;
        memcpy(ov[nov], data + at + 2, end - at - 2);
        ov[nov][end - at - 2] = 0; /* an override with a NUL inside is simply cut there */
        nov++;
        at = nl ? end + 1 : size;
    }
    ml_experiment x;
    ml_err err = {0};
    int rc = experiment_parse(&x, (const char *)data, size, "fuzz.yaml", nov, ov, "runs", &err);
    for (int i = 0; i < nov; i++) free(ov[i]);
    if (rc == ML_OK) {
        /* an accepted experiment has runs, each resolved, named and placed */
        if (x.nruns < 1 || x.nruns > ML_MAX_RUNS) abort();
        for (int r = 0; r < x.nruns; r++)
            if (!x.runs[r].id[0] || !x.runs[r].name[0] || strncmp(x.runs[r].cfg.run.dir, "runs/", 5)) abort();
        check_ids_unique(&x);
        experiment_free(&x);
    } else if (rc != ML_EINPUT || err.code != ML_EINPUT || !err.msg[0]) {
        abort(); /* every rejection is an input error with a message */
    }
    return 0;
}

#ifdef ML_FUZZ_REPLAY
#include <dirent.h>
#include <sys/stat.h>

static int replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return -1;
    }
    size_t cap = 1 << 16, len = 0, n;
    uint8_t *buf = malloc(cap);
    while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            uint8_t *grown = realloc(buf, cap *= 2);
            if (!grown) free(buf);
            buf = grown;
        }
    }
    fclose(f);
    if (!buf) {
        fprintf(stderr, "%s: out of memory\n", path);
        return -1;
    }
    /* a copy of exactly len bytes, so reading past the end is caught as under libFuzzer */
    uint8_t *exact = malloc(len ? len : 1);
    if (!exact) {
        free(buf);
        return -1;
    }
    memcpy(exact, buf, len);
    free(buf);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    return 0;
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv) {
    int n = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st)) {
            perror(argv[i]);
            bad++;
            continue;
        }
        if (!S_ISDIR(st.st_mode)) {
            if (replay_file(argv[i])) bad++;
            else n++;
            continue;
        }
        DIR *d = opendir(argv[i]);
        if (!d) {
            perror(argv[i]);
            bad++;
            continue;
        }
        char **names = NULL;
        int count = 0, cap = 0;
        for (struct dirent *e; (e = readdir(d));) {
            if (e->d_name[0] == '.') continue;
            if (count == cap) {
                char **grown = realloc(names, (size_t)(cap = cap ? 2 * cap : 64) * sizeof *names);
                if (!grown) break;
                names = grown;
            }
            size_t len = strlen(argv[i]) + strlen(e->d_name) + 2;
            if (!(names[count] = malloc(len))) break;
            snprintf(names[count++], len, "%s/%s", argv[i], e->d_name);
        }
        closedir(d);
        qsort(names, (size_t)count, sizeof *names, by_name);
        for (int j = 0; j < count; j++) {
            struct stat fst;
            if (!stat(names[j], &fst) && S_ISREG(fst.st_mode)) {
                if (replay_file(names[j])) bad++;
                else n++;
            }
            free(names[j]);
        }
        free(names);
    }
    printf("replayed %d inputs\n", n);
    return bad ? 1 : 0;
}
#endif
