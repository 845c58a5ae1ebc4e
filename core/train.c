/* train.c: the training loop over the model and the data loaders. It owns the run folder layout
 * (run.dir/config.yaml, log.txt, checkpoint.bin) and the progress line; the model owns the math. */
#include "train.h"

#include <errno.h>
#include <signal.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "checkpoint.h"
#include "dataloader.h"
#include "metrics.h"
#include "model.h"
#include "recorder.h"
#include "resources.h"

static volatile sig_atomic_t stop_signal;
static void on_stop_signal(int sig) { stop_signal = sig; }

float train_lr(const ml_config *c, int step) {
    const float lr = c->train.lr, lo = lr * c->train.min_lr_ratio;
    if (step < c->train.warmup) return lr * (step + 1) / c->train.warmup;
    int decay = c->train.steps - c->train.warmup;
    if (decay <= 0) return lr;
    float progress = (float)(step - c->train.warmup) / decay;
    if (progress > 1) progress = 1;
    return lo + 0.5f * (lr - lo) * (1 + cosf((float)M_PI * progress));
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}


/* The worst MoE layer's MaxVio over a step's loads (analysis/metrics.c). */
static float worst_maxvio(const ml_model *m, const ml_route_stats *st, int *worst_layer) {
    float worst = 0;
    *worst_layer = -1;
    for (int l = 0; l < m->L; l++) {
        if (!m->layer_k[l]) continue;
        ml_load_metrics mt;
        metrics_compute_i64(&mt, st->tokens_per_expert + (size_t)l * m->E, m->E);
        if (mt.total > 0 && (*worst_layer < 0 || mt.maxvio > worst)) worst = (float)mt.maxvio, *worst_layer = l;
    }
    return worst;
}

/* Mean loss over `batches` batches spread evenly over the validation shard (its documents come in hashed
 * order, so one contiguous stretch would measure only a document or two). */
static float evaluate(ml_model *m, ml_loader *val, int batches) {
    const size_t span = val->shard.ntokens - ((size_t)val->B * val->T + 1);
    double sum = 0;
    m->eval_mode = 1;
    route_stats_reset(&m->eval_stats);
    for (int i = 0; i < batches; i++) {
        val->pos = span * i / batches;
        loader_next(val);
        sum += model_forward(m, val->inputs, val->targets);
    }
    m->eval_mode = 0;
    return (float)(sum / batches);
}

void train_fmt_duration(char *buf, size_t n, double s) {
    if (!isfinite(s) || s < 0) s = 0;
    int t = (int)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%dh%02dm", t / 3600, t / 60 % 60);
    else snprintf(buf, n, "%dm%02ds", t / 60, t % 60);
}

int train_run(const ml_config *cfg_in, const ml_train_opts *opts, ml_train_result *res, ml_err *err) {
    ml_config cfg = *cfg_in;
    int rc = config_validate(&cfg, err);
    if (rc) return rc;
    if (!cfg.run.dir[0]) snprintf(cfg.run.dir, sizeof cfg.run.dir, "runs/%s-%llu", cfg.preset,
                                  (unsigned long long)cfg.seed);
    FILE *out = opts && opts->progress ? opts->progress : stdout;
    const int quiet = opts && opts->quiet, tty = isatty(fileno(out));
    memset(res, 0, sizeof *res);

    char train_path[1100], val_path[1100], ckpt_path[1100], path[1100];
    snprintf(train_path, sizeof train_path, "%s/train.bin", cfg.data.dir);
    snprintf(val_path, sizeof val_path, "%s/val.bin", cfg.data.dir);
    const ml_backend *be; /* first: a backend that cannot run is the first thing to say */
    char why[512];
    if (backend_select(opts ? opts->backend : NULL, &be, why, sizeof why)) return ml_errf(err, ML_EINPUT, "%s", why);
    ml_loader train = {0}, val = {0};
    const int B = cfg.train.batch, T = cfg.model.seq_len;
    if ((rc = loader_open(&train, train_path, B, T, cfg.model.vocab, err))) return rc;
    if ((rc = loader_open(&val, val_path, B, T, cfg.model.vocab, err))) {
        loader_close(&train);
        return rc;
    }
    ml_model *m = calloc(1, sizeof *m);
    if ((rc = model_init(m, &cfg, be, B, 0, err))) {
        free(m);
        goto done_loaders;
    }
    if (make_dirs(cfg.run.dir)) {
        rc = ml_errf(err, ML_EINPUT, "%s: %s", cfg.run.dir, strerror(errno));
        goto done_model;
    }
    snprintf(ckpt_path, sizeof ckpt_path, "%s/checkpoint.bin", cfg.run.dir);

    ml_train_state st = {0};
    rng_seed(&st.rng, cfg.seed);
    if (cfg.run.resume[0]) {
        if ((rc = checkpoint_load(cfg.run.resume, m, &st, err))) goto done_model;
        train.pos = st.data_pos;
    } else {
        if ((rc = model_init_weights(m, rng_next(&st.rng), err))) goto done_model;
    }
    snprintf(path, sizeof path, "%s/config.yaml", cfg.run.dir);
    FILE *cf = fopen(path, "w");
    if (!cf) {
        rc = ml_errf(err, ML_EINPUT, "%s: %s", path, strerror(errno));
        goto done_model;
    }
    config_write(&cfg, cf);
    fclose(cf);
    snprintf(path, sizeof path, "%s/log.txt", cfg.run.dir);
    FILE *log = fopen(path, cfg.run.resume[0] ? "a" : "w");
    ml_recorder rec;
    if ((rc = recorder_open(&rec, &cfg, m, cfg.run.resume[0] ? st.step : -1, err))) goto done_log;
    const char *final_status = "failed";
    stop_signal = 0;
    struct sigaction sa = {.sa_handler = on_stop_signal}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);

    if (!quiet)
        fprintf(out, "moelab: %s, %zu parameters (%.1fM active/token), %d steps of %d tokens, run %s in %s\n",
                cfg.preset, m->nparams, model_active_params(&cfg) / 1e6, cfg.train.steps,
                B * T * cfg.train.accum, rec.id, cfg.run.dir);
    const int tokens_per_step = B * T * cfg.train.accum;
    float val_loss = NAN, loss = NAN, maxvio = 0, val_maxvio = NAN;
    double t_start = now_s(), t_last = t_start;
    int steps_timed = 0;
    for (int step = st.step; step < cfg.train.steps; step++) {
        if (stop_signal) {
            /* Ctrl-C or SIGTERM: keep what was done (trace, checkpoint) and mark the run killed */
            rc = ml_errf(err, ML_ERUN, "interrupted by signal %d after step %d; resume with --resume %s", stop_signal,
                         st.step, cfg.run.dir);
            if (!recorder_flush(&rec, err) && !checkpoint_save(ckpt_path, m, &st, err)) final_status = "killed";
            goto done_record;
        }
        const float lr = train_lr(&cfg, step);
        model_zero_grad(m);
        model_begin_step(m, st.tokens_seen);
        double loss_sum = 0, aux_sum = 0;
        for (int micro = 0; micro < cfg.train.accum; micro++) {
            loader_next(&train);
            loss_sum += model_forward(m, train.inputs, train.targets);
            aux_sum += m->last_aux;
            model_backward(m, 1.0f / cfg.train.accum);
        }
        loss = (float)(loss_sum / cfg.train.accum);
        double norm = model_grad_norm(m);
        if (!isfinite(loss) || !isfinite(norm)) {
            rc = ml_errf(err, ML_ERUN,
                         "step %d: %s is %s; stopped. The last good checkpoint (if any) is %s; try a lower train.lr",
                         step + 1, isfinite(loss) ? "gradient norm" : "loss", "not finite", ckpt_path);
            if (log) fprintf(log, "error: %s\n", err->msg);
            goto done_record;
        }
        float clip = cfg.train.grad_clip > 0 && norm > cfg.train.grad_clip ? (float)(cfg.train.grad_clip / norm) : 1;
        model_adamw(m, lr, clip, step + 1);
        model_end_step(m);
        st.step = step + 1;
        st.tokens_seen += tokens_per_step;
        st.data_pos = train.pos;
        int worst_layer;
        maxvio = worst_maxvio(m, &m->stats, &worst_layer);
        steps_timed++;
        if ((rc = recorder_step(&rec, &cfg, m, st.step, st.tokens_seen, loss, lr, (float)norm, err))) goto done_record;

        const int last = st.step == cfg.train.steps;
        const int logged = last || st.step % cfg.train.log_every == 0;
        const int do_eval = last || (cfg.train.eval_every && st.step % cfg.train.eval_every == 0);
        if (do_eval) {
            val_loss = evaluate(m, &val, cfg.train.eval_batches);
            int l;
            val_maxvio = worst_maxvio(m, &m->eval_stats, &l); /* MaxVio_global: loads on held-out data */
            const char *keys[] = {"val_loss", "val_maxvio"};
            const double vals[] = {val_loss, val_maxvio};
            if ((rc = recorder_eval(&rec, m, st.step, val_loss, err)) ||
                (rc = recorder_metrics(&rec, st.step, 2, keys, vals, err)))
                goto done_record;
        }
        if (logged) {
            const char *keys[] = {"loss", "aux_loss", "lr", "grad_norm", "maxvio"};
            const double vals[] = {loss, aux_sum / cfg.train.accum, lr, norm, maxvio};
            if ((rc = recorder_metrics(&rec, st.step, 5, keys, vals, err))) goto done_record;
        }
        double t = now_s(), tok_s = (double)steps_timed * tokens_per_step / (t - t_start);
        if (log) {
            fprintf(log, "step %d loss %.5f aux %.5f lr %.3e norm %.4f maxvio %.4f", st.step, loss,
                    aux_sum / cfg.train.accum, lr, norm, maxvio);
            if (do_eval) fprintf(log, " val %.5f val_maxvio %.4f", val_loss, val_maxvio);
            fputc('\n', log);
        }
        /* on a terminal the line refreshes in place (at most 10 times a second) and is kept every log_every
         * steps; otherwise plain lines every log_every steps */
        const int report = logged || do_eval || t - t_last >= 0.1;
        if (report && opts && opts->on_progress) {
            ml_train_progress p = {.step = st.step, .steps = cfg.train.steps, .loss = loss, .val_loss = val_loss,
                                   .maxvio = maxvio, .worst_layer = worst_layer, .tokens_per_s = tok_s,
                                   .eta_s = (cfg.train.steps - st.step) * (double)tokens_per_step / tok_s};
            opts->on_progress(opts->progress_ctx, &p);
            if (quiet) t_last = t;
        }
        if (!quiet && (logged || do_eval || (tty && t - t_last >= 0.1))) {
            char eta[32], vbuf[16];
            train_fmt_duration(eta, sizeof eta, (cfg.train.steps - st.step) * (double)tokens_per_step / tok_s);
            snprintf(vbuf, sizeof vbuf, isnan(val_loss) ? "-" : "%.4f", val_loss);
            t_last = t;
            fprintf(out, "%sstep %5d/%d | loss %.4f | val %s | lr %.2e | %.0f tok/s | maxvio %.2f (layer %d) | eta %s",
                    tty ? "\r\033[K" : "", st.step, cfg.train.steps, loss, vbuf, lr, tok_s, maxvio, worst_layer, eta);
            if (logged || do_eval || !tty) fputc('\n', out);
            fflush(out);
        }
        const int stop = opts && opts->stop_after > 0 && st.step == opts->stop_after;
        if (last || stop || (cfg.train.ckpt_every && st.step % cfg.train.ckpt_every == 0)) {
            /* the trace first: it must hold every step the checkpoint has */
            if ((rc = recorder_flush(&rec, err)) || (rc = checkpoint_save(ckpt_path, m, &st, err))) goto done_record;
        } else if (st.step % cfg.trace.flush_every == 0) {
            if ((rc = recorder_flush(&rec, err))) goto done_record;
        }
        if (stop) {
            final_status = "queued"; /* resumable: not finished, not failed */
            break;
        }
        if (last) final_status = "finished";
    }
    res->steps = st.step;
    res->train_loss = loss;
    res->val_loss = val_loss;
    res->worst_maxvio = maxvio;
    res->tokens_per_s = steps_timed ? (double)steps_timed * tokens_per_step / (now_s() - t_start) : 0;
    if (!strcmp(final_status, "finished") || st.step == cfg.train.steps) {
        final_status = "finished";
        const char *keys[] = {"train_loss", "val_loss", "maxvio", "val_maxvio", "tokens_per_s", "steps"};
        const double vals[] = {loss, val_loss, maxvio, val_maxvio, res->tokens_per_s, st.step};
        for (int i = 0; i < 6 && !rc; i++) rc = recorder_summary(&rec, keys[i], vals[i], err);
        /* per-layer MaxVio_global of the final evaluation */
        for (int l = 0; l < m->L && !rc; l++) {
            if (!m->layer_k[l]) continue;
            ml_load_metrics mt;
            metrics_compute_i64(&mt, m->eval_stats.tokens_per_expert + (size_t)l * m->E, m->E);
            char key[48];
            snprintf(key, sizeof key, "layer%d.val_maxvio", l);
            rc = recorder_summary(&rec, key, mt.maxvio, err);
        }
    }
    if (!quiet && !rc) fprintf(out, "done: %d steps, train loss %.4f, val loss %.4f, checkpoint %s\n", st.step, loss,
                               val_loss, ckpt_path);
done_record:
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    {
        ml_err close_err = {0};
        int crc = recorder_close(&rec, rc && strcmp(final_status, "killed") ? "failed" : final_status,
                                 rc ? err->msg : NULL, &close_err);
        if (!rc && crc) rc = crc, *err = close_err;
    }
done_log:
    if (log) fclose(log);
done_model:
    model_free(m);
    free(m);
done_loaders:
    loader_close(&train);
    loader_close(&val);
    return rc;
}
