/* trace_bench.c: what the HDF5 trace costs. (1) Writes a synthetic full-scale trace (default 100,000 steps x
 * 56 layers x 96 experts, 8192 tokens per layer and step, loads skewed like an imbalanced top-1 router, bias
 * updated loss-free style) in large flushes: write time and file size. (2) Reads one layer's /load over all
 * steps and computes the per-step MaxVio and its mean over steps, with the file in the page cache and out
 * of it. (3) The per-step cost of trace_append plus a trace_flush every 20 steps for a small-cpu-sized trace
 * (4 layers x 96 experts), and the file size that leaves. Prints the numbers; not a test.
 *
 *   trace_bench [--dir DIR] [--steps N] [--layers L] [--experts E] [--flush-every N]
 *               [--small-steps N] [--small-every N] [--keep] */
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "trace.h"

enum { TOKENS = 8192, NOISE_TABLE = 1 << 16 };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t next_u64(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static double uniform(void) { return (double)(next_u64() >> 11) * (1.0 / 9007199254740992.0); }

static double normal(void) { /* Box-Muller; only used to fill tables */
    double u = uniform(), v = uniform();
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* Synthetic routing: layer l sends tokens with fixed skewed shares (lognormal, strongest in the lowest
 * layers, as in Sigma-MoE-Tiny's Fig. 2a: ~3x the uniform share on the busiest expert of layer 0), counts
 * with binomial-sized noise from a table of normals, summing to TOKENS. */
typedef struct {
    int L, E;
    double *share;   /* (L,E) */
    float *noise;    /* NOISE_TABLE N(0,1) draws */
    float *bias;     /* (L,E), updated like loss-free balancing */
    int32_t *load, *selected, *topk, *dropped;
    float *gate, *policy;
} synth;

static void synth_init(synth *g, int L, int E) {
    g->L = L;
    g->E = E;
    g->share = malloc(sizeof(double) * L * E);
    g->noise = malloc(sizeof(float) * NOISE_TABLE);
    g->bias = calloc((size_t)L * E, sizeof(float));
    g->load = malloc(sizeof(int32_t) * L * E);
    g->selected = malloc(sizeof(int32_t) * L * E);
    g->gate = malloc(sizeof(float) * L * E);
    g->topk = malloc(sizeof(int32_t) * L);
    g->dropped = calloc((size_t)L, sizeof(int32_t));
    g->policy = malloc(sizeof(float) * L);
    for (int i = 0; i < NOISE_TABLE; i++) g->noise[i] = (float)normal();
    for (int l = 0; l < L; l++) {
        double sigma = 0.1 + 0.3 * (1.0 - (double)l / (L > 1 ? L - 1 : 1)), total = 0;
        for (int e = 0; e < E; e++) total += g->share[l * E + e] = exp(sigma * normal());
        for (int e = 0; e < E; e++) g->share[l * E + e] /= total;
        g->topk[l] = l < L / 7 ? 2 : 1;
    }
}

static void synth_free(synth *g) {
    free(g->share), free(g->noise), free(g->bias), free(g->load), free(g->selected);
    free(g->gate), free(g->topk), free(g->dropped), free(g->policy);
}

static ml_trace_row synth_step(synth *g, int64_t step) {
    int L = g->L, E = g->E;
    for (int l = 0; l < L; l++) {
        int32_t *load = g->load + (size_t)l * E;
        const double *share = g->share + (size_t)l * E;
        int total = 0, busiest = 0;
        for (int e = 0; e < E; e++) {
            double mean = TOKENS * share[e];
            double x = mean + sqrt(mean) * g->noise[next_u64() & (NOISE_TABLE - 1)];
            load[e] = x > 0 ? (int32_t)(x + 0.5) : 0;
            total += load[e];
            if (load[e] > load[busiest]) busiest = e;
        }
        load[busiest] += TOKENS - total;
        if (load[busiest] < 0) load[busiest] = 0;
        double policy = 0;
        for (int e = 0; e < E; e++) {
            float f = (float)load[e] / TOKENS;
            g->gate[l * E + e] = 0.7f * (float)share[e] + 0.3f * f;
            g->selected[l * E + e] = load[e];
            /* arXiv 2408.15664: b_i += u * sign(mean load - load_i) */
            g->bias[l * E + e] += load[e] * E < TOKENS ? 1e-3f : load[e] * E > TOKENS ? -1e-3f : 0.0f;
            policy += (double)f * g->gate[l * E + e];
        }
        g->policy[l] = (float)(policy * E);
    }
    return (ml_trace_row){.step = step, .tokens = (step + 1) * TOKENS, .loss = 3.0f + 7.0f / (1.0f + step * 1e-3f),
                          .lr = 3e-4f, .grad_norm = 1.0f, .policy_loss = g->policy, .load = g->load,
                          .selected = g->selected, .gate_mean = g->gate, .bias = g->bias, .topk = g->topk,
                          .dropped = g->dropped};
}

static double file_mb(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (double)st.st_size / 1e6 : -1;
}

/* Drops the file's pages from the page cache (clean pages; no root needed), for a cold read. */
static void evict(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

static int die(const ml_err *err) {
    fprintf(stderr, "trace_bench: %s\n", err->msg);
    return 1;
}

/* Reads layer `layer` of /load over all steps; returns the seconds, the mean per-step MaxVio in *mean. */
static double summarise(const char *path, int layer, int64_t n, int E, int32_t *buf, double *mean, ml_err *err) {
    double t0 = now();
    if (trace_read_layer_i32(path, "load", layer, 0, n, buf, err)) return -1;
    double sum = 0;
    for (int64_t s = 0; s < n; s++) {
        const int32_t *x = buf + s * E;
        int64_t total = 0;
        int32_t mx = x[0];
        for (int e = 0; e < E; e++) {
            total += x[e];
            mx = x[e] > mx ? x[e] : mx;
        }
        double m = (double)total / E;
        sum += total > 0 ? (mx - m) / m : 0; /* MaxVio, arXiv 2408.15664 */
    }
    *mean = n ? sum / (double)n : 0;
    return now() - t0;
}

int main(int argc, char **argv) {
    const char *dir = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    int64_t steps = 100000, flush_every = 1024, small_steps = 10000, small_every = 20;
    int L = 56, E = 96, keep = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--keep")) keep = 1;
        else if (v && !strcmp(a, "--dir")) dir = v, i++;
        else if (v && !strcmp(a, "--steps")) steps = atoll(v), i++;
        else if (v && !strcmp(a, "--layers")) L = atoi(v), i++;
        else if (v && !strcmp(a, "--experts")) E = atoi(v), i++;
        else if (v && !strcmp(a, "--flush-every")) flush_every = atoll(v), i++;
        else if (v && !strcmp(a, "--small-steps")) small_steps = atoll(v), i++;
        else if (v && !strcmp(a, "--small-every")) small_every = atoll(v), i++;
        else {
            fprintf(stderr, "usage: trace_bench [--dir DIR] [--steps N] [--layers L] [--experts E] [--flush-every N]"
                            " [--small-steps N] [--small-every N] [--keep]\n");
            return 2;
        }
    }
    if (steps < 1 || L < 1 || E < 1 || flush_every < 1 || small_steps < 0 || small_every < 1) {
        fprintf(stderr, "trace_bench: every count must be positive\n");
        return 2;
    }
    char path[4096], small_path[4096];
    snprintf(path, sizeof path, "%s/trace_bench_%d.h5", dir, (int)getpid());
    snprintf(small_path, sizeof small_path, "%s/trace_bench_small_%d.h5", dir, (int)getpid());
    ml_err err = {0};

    /* (1) the full-scale trace */
    synth g;
    synth_init(&g, L, E);
    ml_trace *t;
    if (trace_open(&t, path, "bench", "model.layers: 56\nmodel.experts: 96\n", L, E, -1, &err)) return die(&err);
    double gen = 0, append = 0, flush = 0;
    for (int64_t s = 0; s < steps; s++) {
        double t0 = now();
        ml_trace_row row = synth_step(&g, s);
        double t1 = now();
        if (trace_append(t, &row, &err)) return die(&err);
        double t2 = now();
        if ((s + 1) % flush_every == 0 && trace_flush(t, &err)) return die(&err);
        double t3 = now();
        gen += t1 - t0, append += t2 - t1, flush += t3 - t2;
    }
    double t0 = now();
    if (trace_close(t, &err)) return die(&err);
    flush += now() - t0;
    double raw_mb = (double)steps * ((double)L * E * 16 + L * 12 + 24) / 1e6, mb = file_mb(path);
    printf("write   %lld steps x %d layers x %d experts, a flush every %lld steps: %.1f s (append %.1f s, flush "
           "%.1f s; generating the rows took another %.1f s)\n",
           (long long)steps, L, E, (long long)flush_every, append + flush, append, flush, gen);
    printf("        %.0f MB of rows -> %.0f MB file (%.2fx smaller, %.0f bytes per step), %.0f MB/s of rows\n", raw_mb,
           mb, raw_mb / mb, mb * 1e6 / (double)steps, raw_mb / (append + flush));

    /* (2) one layer's MaxVio over the run */
    int32_t *buf = malloc(sizeof(int32_t) * (size_t)steps * E);
    double mean;
    for (int layer = 0; layer < L; layer += L > 1 ? L - 1 : 1) {
        evict(path);
        double cold = summarise(path, layer, steps, E, buf, &mean, &err);
        double warm = summarise(path, layer, steps, E, buf, &mean, &err);
        if (cold < 0 || warm < 0) return die(&err);
        printf("summary layer %d: MaxVio over %lld steps (read %.1f MB of /load): %.3f s from disk, %.3f s from the "
               "page cache; mean MaxVio %.4f\n",
               layer, (long long)steps, (double)steps * E * 4 / 1e6, cold, warm, mean);
    }
    free(buf);
    synth_free(&g);
    if (!keep) unlink(path);
    else printf("kept %s\n", path);

    /* (3) small-cpu: a row every step, a flush every small_every steps */
    if (small_steps > 0) {
        const int SL = 4;
        synth_init(&g, SL, E);
        if (trace_open(&t, small_path, "bench-small", "preset: small-cpu\n", SL, E, -1, &err)) return die(&err);
        double total = 0, flushing = 0, worst = 0;
        for (int64_t s = 0; s < small_steps; s++) {
            ml_trace_row row = synth_step(&g, s);
            double t1 = now();
            if (trace_append(t, &row, &err)) return die(&err);
            double t2 = now();
            if ((s + 1) % small_every == 0 && trace_flush(t, &err)) return die(&err);
            double t3 = now();
            total += t3 - t1;
            flushing += t3 - t2;
            worst = t3 - t2 > worst ? t3 - t2 : worst;
        }
        if (trace_close(t, &err)) return die(&err);
        double small_mb = file_mb(small_path);
        /* the same rows in one flush: what the file would be without rewriting partial chunks */
        char once_path[4200];
        snprintf(once_path, sizeof once_path, "%s.once", small_path);
        rng_state = 0x9e3779b97f4a7c15ull;
        synth_free(&g);
        synth_init(&g, SL, E);
        if (trace_open(&t, once_path, "bench-small", "preset: small-cpu\n", SL, E, -1, &err)) return die(&err);
        for (int64_t s = 0; s < small_steps; s++) {
            ml_trace_row row = synth_step(&g, s);
            if (trace_append(t, &row, &err)) return die(&err);
        }
        if (trace_close(t, &err)) return die(&err);
        int64_t flushes = small_steps / small_every;
        printf("small   %lld steps x %d layers x %d experts, an append every step and a flush every %lld: %.0f us per "
               "step; a flush takes %.2f ms on average, %.2f ms at most\n",
               (long long)small_steps, SL, E, (long long)small_every, total / (double)small_steps * 1e6,
               flushes ? flushing / (double)flushes * 1e3 : 0.0, worst * 1e3);
        printf("        file %.2f MB (%.2f MB when written in one flush)\n", small_mb, file_mb(once_path));
        synth_free(&g);
        if (!keep) unlink(small_path), unlink(once_path);
    }
    return 0;
}
