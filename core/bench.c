/* bench.c: `moelab bench`: training throughput of a preset on this machine. Measures the GEMM peak first
 * (the best of several large GEMMs: multi-threaded sgemm on the CPU, cuBLAS bf16 or fp32 on a GPU), then
 * times forward, backward and the optimizer over a number of steps and reports tokens/s, achieved GFLOP/s,
 * MFU (6 x active parameters per token against that peak) and, on a GPU, a per-op breakdown from CUDA
 * events over a few more steps. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "config.h"
#include "memplan.h"
#include "model.h"
#include "recorder.h"
#ifdef ML_HAVE_CUDA
#include "backend_cuda.h"
#endif
#include "rng.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Best GFLOP/s of n x n x n sgemm over reps runs. */
static double sgemm_peak(int n, int reps) {
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    for (int i = 0; i < n * n; i++) a[i] = (float)(i % 7) * 0.1f, b[i] = (float)(i % 5) * 0.1f;
    double best = 0;
    for (int r = 0; r < reps; r++) {
        double t = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        double g = 2.0 * n * n * n / (now_s() - t) / 1e9;
        best = g > best ? g : best;
    }
    free(a), free(b), free(c);
    return best;
}

int cli_bench(int argc, char **argv) {
    ml_config cfg;
    config_preset(&cfg, "small-cpu", NULL);
    int steps = 10, warmup = 2, json = 0, measure_peak = 1;
    const char *backend = "cpu";
    ml_err err = {0};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: moelab bench [preset=NAME] [key=value ...] [--steps N] [--warmup N] [--json]\n"
                   "                    [--backend cpu|cuda|cuda-fp32|auto] [--no-peak]\n\n"
                   "Times training steps (forward + backward + AdamW) of a preset (default small-cpu) on random\n"
                   "tokens and reports tokens/s, achieved GFLOP/s (6 x active params + attention per token),\n"
                   "MFU (6 x active params per token) against this machine's GEMM peak, measured first (sgemm\n"
                   "on the CPU; cuBLAS bf16 for cuda, fp32 for cuda-fp32), and on a GPU the time per op.\n"
                   "A step is train.accum micro-batches of train.batch x model.seq_len tokens and one AdamW update,\n"
                   "as in training. --no-peak skips the peak measurement (no MFU; e.g. under a profiler).\n");
            return 0;
        }
        if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--no-peak")) measure_peak = 0;
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc) backend = argv[++i];
        else if (config_set(&cfg, argv[i], &err)) {
            fprintf(stderr, "moelab bench: %s\n", err.msg);
            return 2;
        }
    }
    if (steps < 1 || warmup < 0) {
        fprintf(stderr, "moelab bench: --steps must be >= 1 and --warmup >= 0\n");
        return 2;
    }
    if (config_validate(&cfg, &err)) {
        fprintf(stderr, "moelab bench: %s\n", err.msg);
        return 2;
    }
    const ml_backend *be;
    char why[512];
    if (backend_select(backend, &be, why, sizeof why)) {
        fprintf(stderr, "moelab bench: %s\n", why);
        return 2;
    }
    const int on_gpu = !strncmp(be->name, "cuda", 4), bf16 = !strcmp(be->name, "cuda");
    const char *peak_kind = on_gpu ? (bf16 ? "cuBLAS bf16 8192^3" : "cuBLAS fp32 8192^3") : "sgemm 2048^3";
    double peak = 0;
    if (measure_peak) {
#ifdef ML_HAVE_CUDA
        peak = on_gpu ? cuda_gemm_peak(8192, 5, bf16) : sgemm_peak(2048, 5);
#else
        peak = sgemm_peak(2048, 5);
#endif
    }
    ml_model *m = calloc(1, sizeof *m);
    if (model_init(m, &cfg, be, cfg.train.batch, 0, &err)) {
        fprintf(stderr, "moelab bench: %s\n", err.msg);
        free(m);
        return 1;
    }
    if (model_init_weights(m, cfg.seed, &err)) {
        fprintf(stderr, "moelab bench: %s\n", err.msg);
        model_free(m), free(m);
        return 1;
    }
    const int M = cfg.train.batch * cfg.model.seq_len, accum = cfg.train.accum; /* M tokens per micro-batch */
    int32_t *tok = malloc(sizeof(int32_t) * (M + 1));
    ml_rng rng;
    rng_seed(&rng, cfg.seed);
    for (int i = 0; i <= M; i++) tok[i] = (int32_t)(rng_next(&rng) % cfg.model.vocab);
    double t_fwd = 0, t_bwd = 0, t_opt = 0, t_route = 0, t_trace = 0;
    /* tracing as a run does it: a row every step, written every trace.flush_every steps, into a temp folder */
    char trace_dir[] = "/tmp/moelab_bench_XXXXXX";
    ml_recorder rec;
    ml_config rcfg = cfg;
    int tracing = mkdtemp(trace_dir) != NULL;
    if (tracing) {
        snprintf(rcfg.run.dir, sizeof rcfg.run.dir, "%s", trace_dir);
        rcfg.run.db[0] = 0;
        rcfg.trace.every = 1;
        tracing = recorder_open(&rec, &rcfg, m, -1, &err) == 0;
    }
    long allocs_before = 0;
    /* routing time needs a sync at both ends of each routing section; on a GPU that would slow the timed
     * steps, so there it is measured in the profiled steps below */
    m->time_routing = !on_gpu;
    for (int s = 0; s < warmup + steps; s++) {
#ifdef ML_HAVE_CUDA
        if (on_gpu && s == warmup) allocs_before = cuda_alloc_count();
#endif
        const double r0 = m->routing_seconds;
        double t0 = now_s(), fwd;
        model_zero_grad(m);
        model_begin_step(m, 0);
        fwd = now_s() - t0; /* clearing the gradients counts as forward, as it did before accum */
        for (int micro = 0; micro < accum; micro++) { /* as train.c: one optimizer step per accum micro-batches */
            double ta = now_s();
            model_forward(m, tok, tok + 1);
            be->sync(); /* device backends run asynchronously: time finished work */
            double tb = now_s();
            model_backward(m, 1.0f / accum);
            be->sync();
            fwd += tb - ta;
        }
        double t2 = now_s();
        double norm = model_grad_norm(m);
        model_adamw(m, 1e-4f, norm > 1 ? (float)(1 / norm) : 1, s + 1);
        be->sync();
        double t3 = now_s();
        if (tracing) {
            recorder_step(&rec, &rcfg, m, s + 1, (uint64_t)(s + 1) * M * accum, 0, 1e-4f, (float)norm, &err);
            if ((s + 1) % rcfg.trace.flush_every == 0) recorder_flush(&rec, &err);
        }
        double t4 = now_s();
        if (s >= warmup) t_fwd += fwd, t_bwd += t2 - t0 - fwd, t_opt += t3 - t2, t_route += m->routing_seconds - r0;
        if (s >= warmup) t_trace += t4 - t3;
    }
    if (tracing) {
        /* the final flush belongs to the run too: spread it over the timed steps */
        double t5 = now_s();
        recorder_close(&rec, NULL, NULL, &err);
        t_trace += now_s() - t5;
        char cmd[64];
        snprintf(cmd, sizeof cmd, "rm -rf %s", trace_dir);
        if (system(cmd)) { /* best effort */
        }
    }
    /* the per-op breakdown: a few more steps with an event pair around every op (they cost a little, so
     * they are not part of the timing above) */
    enum { MAX_OPS = 64 };
    ml_op_time ops[MAX_OPS];
    int nops = 0, prof_steps = steps < 3 ? steps : 3;
    long step_allocs = 0;
    double prof_total = 0, mem_gib = 0, mem_total_gib = 0; /* device memory in use after the steps */
    size_t mem_bytes = 0, planned_bytes = 0; /* and what moelab plan says this run allocates */
#ifdef ML_HAVE_CUDA
    if (on_gpu) {
        step_allocs = cuda_alloc_count() - allocs_before;
        size_t used, total;
        cuda_memory_in_use(&used, &total);
        mem_bytes = used, mem_gib = used / 1073741824.0, mem_total_gib = total / 1073741824.0;
        ml_memory_plan plan;
        if (!memory_plan(&cfg, be->name, cfg.train.batch, &plan, &err)) planned_bytes = memory_plan_total(&plan);
        m->time_routing = 1;
        const double r0 = m->routing_seconds, w0 = now_s();
        cuda_profile_start();
        for (int s = 0; s < prof_steps; s++) {
            model_zero_grad(m);
            model_begin_step(m, 0);
            for (int micro = 0; micro < accum; micro++) {
                model_forward(m, tok, tok + 1);
                model_backward(m, 1.0f / accum);
            }
            double norm = model_grad_norm(m);
            model_adamw(m, 1e-4f, norm > 1 ? (float)(1 / norm) : 1, warmup + steps + s + 1);
        }
        nops = cuda_profile_stop(ops, MAX_OPS);
        /* routing's share of those steps, applied to the timed ones */
        t_route = (m->routing_seconds - r0) / (now_s() - w0) * (t_fwd + t_bwd + t_opt);
        for (int i = 0; i < nops; i++) prof_total += ops[i].ms;
        for (int i = 1; i < nops; i++) /* slowest first */
            for (int j = i; j > 0 && ops[j].ms > ops[j - 1].ms; j--) {
                ml_op_time t = ops[j];
                ops[j] = ops[j - 1], ops[j - 1] = t;
            }
    }
#else
    (void)allocs_before;
#endif
    /* attention's achieved rate in the profiled steps: causal FLOPs, 4 B H T^2 hd / 2 per layer forward and
     * 2.5 times that backward (FlashAttention's counting: five matmuls, none counted twice) */
    const double attn_fwd_flop = 2.0 * m->B * m->H * (double)m->T * m->T * m->hd * m->L;
    double attn_tflops[2] = {0, 0}; /* forward, backward */
    for (int i = 0; i < nops; i++)
        for (int d = 0; d < 2; d++)
            if (!strcmp(ops[i].op, d ? "attention_backward" : "attention_forward") && ops[i].ms > 0)
                attn_tflops[d] = (d ? 2.5 : 1.0) * attn_fwd_flop * prof_steps / (ops[i].ms * 1e-3) / 1e12;
    const char *expert_gemm = "cpu";
#ifdef ML_HAVE_CUDA
    if (on_gpu) expert_gemm = cuda_grouped_gemm_path(bf16);
#endif
    double total = t_fwd + t_bwd + t_opt, tok_s = (double)M * accum * steps / total;
    double attn = 6.0 * cfg.model.layers * cfg.model.seq_len * cfg.model.dim;
    double flops_tok = 6 * model_active_params(&cfg) + attn;
    double gflops = flops_tok * tok_s / 1e9;
    double mfu = peak > 0 ? 6 * model_active_params(&cfg) * tok_s / 1e9 / peak : 0, of_peak = peak > 0 ? gflops / peak : 0;
    if (json) {
        printf("{\"preset\": \"%s\", \"tokens_per_step\": %d, \"accum\": %d, \"steps\": %d, \"tokens_per_s\": %.1f, "
               "\"ms_per_step\": %.2f, \"forward_ms\": %.2f, \"backward_ms\": %.2f, \"optimizer_ms\": %.2f, "
               "\"routing_ms\": %.2f, \"routing_fraction\": %.4f, \"trace_ms\": %.3f, \"trace_fraction\": %.5f, "
               "\"gflops\": %.2f, \"peak_gflops\": %.2f, \"peak_kind\": \"%s\", \"fraction_of_peak\": %.4f, "
               "\"mfu\": %.4f, \"params\": %zu, \"active_params\": %.0f, \"backend\": \"%s\", "
               "\"step_allocations\": %ld, \"expert_gemm\": \"%s\", \"attention_tflops_forward\": %.2f, "
               "\"attention_tflops_backward\": %.2f, \"device_memory_gib\": %.2f, "
               "\"device_memory_total_gib\": %.2f, \"device_memory_bytes\": %zu, \"planned_memory_bytes\": %zu, "
               "\"ops\": {",
               cfg.preset, M * accum, accum, steps, tok_s, 1e3 * total / steps, 1e3 * t_fwd / steps, 1e3 * t_bwd / steps,
               1e3 * t_opt / steps, 1e3 * t_route / steps, t_route / total, 1e3 * t_trace / steps, t_trace / total,
               gflops, peak, peak_kind, of_peak, mfu, m->nparams, model_active_params(&cfg), be->name,
               step_allocs, expert_gemm, attn_tflops[0], attn_tflops[1], mem_gib, mem_total_gib, mem_bytes,
               planned_bytes);
        for (int i = 0; i < nops; i++)
            printf("%s\"%s\": {\"ms_per_step\": %.3f, \"calls_per_step\": %.1f}", i ? ", " : "", ops[i].op,
                   ops[i].ms / prof_steps, (double)ops[i].calls / prof_steps);
        printf("}}\n");
    } else {
        printf("moelab bench: preset %s, backend %s, %zu parameters, %d tokens/step (%d micro-batch%s of %d), %d steps "
               "(after %d warmup)\n", cfg.preset, be->name, m->nparams, M * accum, accum, accum == 1 ? "" : "es", M,
               steps, warmup);
        if (measure_peak) printf("  GEMM peak (%s, best of 5) %8.1f GFLOP/s\n", peak_kind, peak);
        else printf("  GEMM peak not measured (--no-peak): no MFU\n");
        printf("  step                            %8.2f ms  (forward %.2f, backward %.2f, optimizer %.2f)\n",
               1e3 * total / steps, 1e3 * t_fwd / steps, 1e3 * t_bwd / steps, 1e3 * t_opt / steps);
        printf("  routing (router, policies, stats) %6.2f ms  (%.1f%% of the step; balance.policy=%s)\n",
               1e3 * t_route / steps, 100 * t_route / total, cfg.balance.policy);
        printf("  tracing (row per step, flush/%d) %6.3f ms  (%.2f%% of the step)\n", rcfg.trace.flush_every,
               1e3 * t_trace / steps, 100 * t_trace / total);
        printf("  throughput                      %8.0f tokens/s\n", tok_s);
        if (measure_peak) {
            printf("  achieved                        %8.1f GFLOP/s  (%.1f%% of the GEMM peak; %.3g FLOP/token)\n",
                   gflops, 100 * of_peak, flops_tok);
            printf("  MFU (6 x %.3g active params)    %8.1f%%\n", model_active_params(&cfg), 100 * mfu);
        } else {
            printf("  achieved                        %8.1f GFLOP/s  (%.3g FLOP/token)\n", gflops, flops_tok);
        }
        if (on_gpu) {
            printf("  device allocations during the timed steps: %ld\n", step_allocs);
            printf("  device memory in use after them: %.2f GiB of %.2f (moelab plan: %.2f GiB; the rest is the\n"
                   "  CUDA context, cuBLAS's workspace and the allocator's rounding)\n",
                   mem_gib, mem_total_gib, planned_bytes / 1073741824.0);
            printf("  experts' GEMMs: %s\n", expert_gemm);
            printf("  attention: %.1f TFLOP/s forward, %.1f backward (causal FLOPs)\n", attn_tflops[0],
                   attn_tflops[1]);
            printf("  per op (CUDA events, mean of %d more steps; %.2f ms in ops per step):\n", prof_steps,
                   prof_total / prof_steps);
            for (int i = 0; i < nops; i++)
                printf("    %-26s %9.3f ms  %5.1f%%  %6.1f calls\n", ops[i].op, ops[i].ms / prof_steps,
                       100 * ops[i].ms / prof_total, (double)ops[i].calls / prof_steps);
        }
    }
    free(tok);
    model_free(m);
    free(m);
    return 0;
}
