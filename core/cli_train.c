/* cli_train.c: `moelab train` and `moelab plan`: parse preset and key=value overrides into a config, then
 * train it or describe its size. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "balance/policy.h"
#include "config.h"
#include "experiment.h"
#include "model.h"
#include "memplan.h"
#ifdef ML_HAVE_CUDA
#include "backend_cuda.h"
#endif
#include "train.h"

static void train_usage(FILE *f) {
    fprintf(f, "usage: moelab train [preset=NAME] [key=value ...] [--resume RUN_DIR|CHECKPOINT]\n"
               "       moelab train FILE.yaml [key=value ...]\n\n"
               "Trains a model. Start from a preset (default tiny) and override any config key with dotted\n"
               "key=value pairs, e.g.\n"
               "  moelab train preset=small-cpu model.experts=96 train.steps=2000 seed=3\n"
               "or from an experiment file that describes one run (experiments/quickstart.yaml); files with\n"
               "several runs go to moelab sweep.\n\n"
               "Presets: ");
    for (int i = 0; config_preset_names[i]; i++) fprintf(f, "%s%s", i ? ", " : "", config_preset_names[i]);
    fprintf(f, "\nThe run folder (run.dir, default runs/<preset>-<seed>) receives config.yaml, log.txt and\n"
               "checkpoint.bin. --resume continues a run bit for bit from its checkpoint; --stop-after N\n"
               "checkpoints and stops after step N (the schedule still targets train.steps).\n"
               "  --backend B       cpu (default); cuda (bf16 GEMMs, fp32 master weights); cuda-fp32 (fp32\n"
               "                    everywhere, for verification); auto (cuda when a GPU is usable, else cpu)\n"
               "  --help-config     list every key with its default and meaning\n"
               "  --help-policies   list the load-balancing policies (balance.policy) and their keys\n");
}

/* Builds a config from argv's key=value pairs (a preset= pair first applies that preset). */
static int parse_config(ml_config *cfg, int argc, char **argv, const char **resume, int *stop_after,
                        const char **backend, ml_err *err) {
    config_preset(cfg, "tiny", NULL);
    for (int i = 1; i < argc; i++)
        if (!strncmp(argv[i], "preset=", 7) && config_set(cfg, argv[i], err)) return ML_EINPUT;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--stop-after")) {
            if (!stop_after || i + 1 >= argc || atoi(argv[i + 1]) < 1)
                return ml_errf(err, ML_EINPUT, "--stop-after needs a positive step number");
            *stop_after = atoi(argv[++i]);
            continue;
        }
        if (!strcmp(argv[i], "--backend")) {
            if (!backend || i + 1 >= argc) return ml_errf(err, ML_EINPUT, "--backend needs cpu, cuda, cuda-fp32 or auto");
            *backend = argv[++i];
            continue;
        }
        if (!strcmp(argv[i], "--resume")) {
            if (!resume || i + 1 >= argc) return ml_errf(err, ML_EINPUT, "--resume needs a run folder or checkpoint");
            *resume = argv[++i];
            continue;
        }
        if (argv[i][0] == '-') return ml_errf(err, ML_EINPUT, "unknown option '%s'", argv[i]);
        if (strncmp(argv[i], "preset=", 7) && config_set(cfg, argv[i], err)) return ML_EINPUT;
    }
    return config_validate(cfg, err);
}

static int is_yaml(const char *s) {
    size_t n = strlen(s);
    return !strchr(s, '=') && s[0] != '-' &&
           ((n > 5 && !strcmp(s + n - 5, ".yaml")) || (n > 4 && !strcmp(s + n - 4, ".yml")));
}

/* `moelab train FILE.yaml [key=value ...]`: the file's one run, in runs/<id> like a sweep's. */
static int train_file(const char *file, int argc, char **argv) {
    char **overrides = calloc((size_t)argc + 1, sizeof *overrides);
    int n = 0;
    const char *backend = NULL;
    for (int i = 1; i < argc; i++) {
        if (argv[i] == file) continue;
        if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
            backend = argv[++i];
            continue;
        }
        if (argv[i][0] == '-' || !strchr(argv[i], '=')) {
            fprintf(stderr, "moelab train: with an experiment file, only key=value overrides may follow ('%s')\n",
                    argv[i]);
            free(overrides);
            return 2;
        }
        overrides[n++] = argv[i];
    }
    ml_experiment x;
    ml_err err = {0};
    int rc = experiment_load(&x, file, n, overrides, "runs", &err);
    free(overrides);
    if (rc) {
        fprintf(stderr, "moelab train: %s\n", err.msg);
        return 2;
    }
    if (x.nruns != 1) {
        fprintf(stderr, "moelab train: %s describes %d runs; run them with: moelab sweep %s\n", file, x.nruns, file);
        experiment_free(&x);
        return 2;
    }
    ml_config cfg = x.runs[0].cfg;
    experiment_free(&x);
    ml_train_opts opts = {.backend = backend};
    ml_train_result res;
    rc = train_run(&cfg, &opts, &res, &err);
    if (rc) fprintf(stderr, "moelab train: %s\n", err.msg);
    return rc == ML_OK ? 0 : rc == ML_EINPUT ? 2 : 1;
}

int cli_train(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return train_usage(stdout), 0;
        if (!strcmp(argv[i], "--help-config")) return config_print_help(stdout), 0;
        if (!strcmp(argv[i], "--help-policies")) return balance_print_help(stdout), 0;
    }
    for (int i = 1; i < argc; i++)
        if (is_yaml(argv[i])) return train_file(argv[i], argc, argv);
    ml_config cfg;
    ml_err err = {0};
    const char *resume = NULL;
    ml_train_opts opts = {0};
    if (parse_config(&cfg, argc, argv, &resume, &opts.stop_after, &opts.backend, &err)) {
        fprintf(stderr, "moelab train: %s\n", err.msg);
        return 2;
    }
    if (resume) {
        /* a run folder resumes from its checkpoint.bin with its config.yaml; overrides on the command line
         * (say a larger train.steps) apply on top */
        size_t n = strlen(resume);
        if (n > 4 && !strcmp(resume + n - 4, ".bin")) {
            snprintf(cfg.run.resume, sizeof cfg.run.resume, "%s", resume);
        } else {
            char path[1100];
            snprintf(path, sizeof path, "%s/config.yaml", resume);
            if (config_read_file(&cfg, path, &err)) {
                fprintf(stderr, "moelab train: %s\n", err.msg);
                return 2;
            }
            for (int i = 1; i < argc; i++)
                if (strchr(argv[i], '=') && argv[i][0] != '-' && config_set(&cfg, argv[i], &err)) {
                    fprintf(stderr, "moelab train: %s\n", err.msg);
                    return 2;
                }
            snprintf(cfg.run.resume, sizeof cfg.run.resume, "%s/checkpoint.bin", resume);
            snprintf(cfg.run.dir, sizeof cfg.run.dir, "%s", resume);
            if (config_validate(&cfg, &err)) {
                fprintf(stderr, "moelab train: %s\n", err.msg);
                return 2;
            }
        }
    }
    ml_train_result res;
    int rc = train_run(&cfg, &opts, &res, &err);
    if (rc) {
        fprintf(stderr, "moelab train: %s\n", err.msg);
        return rc == ML_EINPUT ? 2 : 1;
    }
    return 0;
}

static double gib(size_t bytes) { return bytes / 1073741824.0; }

/* This machine's memory, for plans on the CPU. */
static size_t host_memory(void) {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? (size_t)pages * (size_t)size : 0;
}

enum { PLAN_CUDA_RESERVE_MIB = 1024 }; /* left for the CUDA context and cuBLAS's workspace */

int cli_plan(int argc, char **argv) {
    const char *backend = "cpu";
    double memory_gib = 0;
    int json = 0, n = 1;
    char **args = malloc(sizeof(char *) * (argc + 1));
    if (!args) return 1;
    args[0] = argv[0];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: moelab plan [preset=NAME] [key=value ...] [--backend cpu|cuda|cuda-fp32] [--memory GIB]\n"
                   "                   [--json]\n\n"
                   "Validates a config and prints its parameter count, active parameters per token, training FLOPs\n"
                   "per token, the rows each expert gets from a micro-batch when routing is balanced (M k / E), and\n"
                   "the memory training takes on the backend (no GPU needed): fp32 weights, gradients and AdamW\n"
                   "moments, the bf16 weight copy (cuda), the activations of a micro-batch of train.batch x\n"
                   "model.seq_len tokens, and the backend's scratch; exactly what moelab allocates, without the\n"
                   "CUDA context or cuBLAS's own workspace. Then whether it fits in --memory GiB (default: this\n"
                   "machine's memory for cpu; for cuda this machine's GPU's, or 79.6, an H100 80GB's, without one,\n"
                   "less %d MiB kept for the CUDA context and cuBLAS) and the largest train.batch that does.\n",
                   PLAN_CUDA_RESERVE_MIB);
            free(args);
            return 0;
        }
        if (!strcmp(argv[i], "--json")) {
            json = 1;
        } else if (!strcmp(argv[i], "--memory")) {
            char *end = NULL;
            memory_gib = i + 1 < argc ? strtod(argv[i + 1], &end) : 0;
            if (!end || *end || !(memory_gib > 0) || memory_gib > 1e6) {
                fprintf(stderr, "moelab plan: --memory needs a size in GiB (e.g. 80)\n");
                free(args);
                return 2;
            }
            i++;
        } else {
            args[n++] = argv[i];
        }
    }
    args[n] = NULL;
    ml_config cfg;
    ml_err err = {0};
    int rc = parse_config(&cfg, n, args, NULL, NULL, &backend, &err);
    free(args);
    const int on_gpu = !strncmp(backend, "cuda", 4);
    ml_memory_plan mem;
    int max_B = 0;
    size_t limit = 0;
    if (!rc) {
        rc = memory_plan(&cfg, backend, cfg.train.batch, &mem, &err);
    }
    if (!rc) {
        size_t capacity = memory_gib > 0 ? (size_t)(memory_gib * 1073741824.0) : on_gpu ? 0 : host_memory();
#ifdef ML_HAVE_CUDA
        if (!capacity) capacity = cuda_device_memory(); /* this machine's GPU, when it has one */
#endif
        if (!capacity) capacity = (size_t)(79.6 * 1073741824.0); /* an H100 80GB's */
        const size_t reserve = on_gpu ? (size_t)PLAN_CUDA_RESERVE_MIB << 20 : 0;
        limit = capacity > reserve ? capacity - reserve : 0;
        memory_gib = gib(capacity);
        rc = memory_plan_max_batch(&cfg, backend, limit, &max_B, &err);
    }
    if (rc) {
        fprintf(stderr, "moelab plan: %s\n", err.msg);
        return rc == ML_EINPUT ? 2 : 1;
    }
    size_t params = model_param_count(&cfg);
    double active = model_active_params(&cfg);
    double attn = 0;
    for (int l = 0; l < cfg.model.layers; l++) attn += 6.0 * cfg.model.seq_len * cfg.model.dim; /* causal QK^T+AV */
    const size_t total = memory_plan_total(&mem);
    const long tokens = (long)cfg.train.batch * cfg.model.seq_len;
    /* rows an expert gets per micro-batch when routing is balanced (M k / E), over the MoE layers' k: with
     * few rows the experts' GEMMs are bound by their weights' traffic, not by math */
    int layer_k[ML_MAX_LAYERS], kmin = 0, kmax = 0;
    if (cfg.model.experts > 0 && !config_layer_k(&cfg, layer_k, &err))
        for (int l = 0; l < cfg.model.layers; l++)
            if (layer_k[l] > 0) {
                kmin = !kmin || layer_k[l] < kmin ? layer_k[l] : kmin;
                kmax = layer_k[l] > kmax ? layer_k[l] : kmax;
            }
    const double rows_min = cfg.model.experts > 0 ? (double)tokens * kmin / cfg.model.experts : 0,
                 rows_max = cfg.model.experts > 0 ? (double)tokens * kmax / cfg.model.experts : 0;
    if (json) {
        printf("{\"preset\": \"%s\", \"params\": %zu, \"active_params\": %.0f, \"train_flops_per_token\": %.6g, "
               "\"backend\": \"%s\", \"batch\": %d, \"seq_len\": %d, \"tokens_per_micro_batch\": %ld, "
               "\"expert_rows_min\": %.1f, \"expert_rows_max\": %.1f, "
               "\"memory_bytes\": {\"state\": %zu, \"weight_copy\": %zu, \"activations\": %zu, \"scratch\": %zu, "
               "\"total\": %zu}, \"memory_limit_bytes\": %zu, \"fits\": %s, \"max_batch\": %d}\n",
               cfg.preset, params, active, 6 * active + attn, backend, cfg.train.batch, cfg.model.seq_len, tokens,
               rows_min, rows_max,
               mem.state, mem.weight_copy, mem.activations, mem.scratch, total, limit, total <= limit ? "true" : "false",
               max_B);
        return 0;
    }
    printf("preset            %s\n", cfg.preset);
    printf("parameters        %zu (%.2fB)\n", params, params / 1e9);
    printf("active per token  %.0f (%.3fB)\n", active, active / 1e9);
    printf("train FLOPs/token %.3g (6 x active + attention)\n", 6 * active + attn);
    printf("micro-batch       train.batch %d x model.seq_len %d = %ld tokens", cfg.train.batch, cfg.model.seq_len,
           tokens);
    if (kmax && rows_min == rows_max) printf("; %.1f rows per expert when balanced (M k / E)", rows_min);
    else if (kmax) printf("; %.1f-%.1f rows per expert when balanced (M k / E, by layer)", rows_min, rows_max);
    printf("\nmemory to train on %s:\n", backend);
    printf("  weights, gradients, AdamW m, v  %8.2f GiB\n", gib(mem.state));
    if (mem.weight_copy) printf("  bf16 weight copy                %8.2f GiB\n", gib(mem.weight_copy));
    printf("  activations                     %8.2f GiB\n", gib(mem.activations));
    if (on_gpu) printf("  backend scratch                 %8.2f GiB\n", gib(mem.scratch));
    printf("  total                           %8.2f GiB%s\n", gib(total),
           on_gpu ? " (+ the CUDA context and cuBLAS's workspace)" : "");
    printf("fits in %.1f GiB", memory_gib);
    if (on_gpu) printf(" (%.0f GiB kept for CUDA)", PLAN_CUDA_RESERVE_MIB / 1024.0);
    printf("  %s; the largest train.batch that fits: %d\n", total <= limit ? "yes" : "NO", max_B);
    return 0;
}
