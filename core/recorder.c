/* recorder.c: trace rows and run-database records of a training run (see recorder.h). */
#include "recorder.h"

#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&buf, &len);
    char chunk[4096];
    for (size_t n; (n = fread(chunk, 1, sizeof chunk, f)) > 0;) fwrite(chunk, 1, n, out);
    fclose(out);
    fclose(f);
    return buf;
}

int recorder_open(ml_recorder *r, const ml_config *cfg, const ml_model *m, int64_t resume_step, ml_err *err) {
    memset(r, 0, sizeof *r);
    if (cfg->run.id[0]) {
        snprintf(r->id, sizeof r->id, "%s", cfg->run.id);
    } else {
        char dir[512];
        snprintf(dir, sizeof dir, "%s", cfg->run.dir);
        snprintf(r->id, sizeof r->id, "%s", basename(dir));
    }
    r->L = m->L, r->E = m->E > 0 ? m->E : 1;
    const size_t LE = (size_t)r->L * r->E;
    r->load = calloc(LE, sizeof(int32_t)), r->selected = calloc(LE, sizeof(int32_t));
    r->topk = calloc(r->L, sizeof(int32_t)), r->dropped = calloc(r->L, sizeof(int32_t));
    r->gate_mean = calloc(LE, sizeof(float)), r->bias = calloc(LE, sizeof(float));
    r->policy_loss = calloc(r->L, sizeof(float));

    char path[1100];
    snprintf(path, sizeof path, "%s/config.yaml", cfg->run.dir);
    char *config_text = read_text(path);
    int rc = ML_OK;
    if (cfg->trace.every > 0) {
        snprintf(path, sizeof path, "%s/trace.h5", cfg->run.dir);
        rc = trace_open(&r->trace, path, r->id, config_text ? config_text : "", r->L, r->E, resume_step, err);
    }
    if (!rc && cfg->run.db[0]) {
        rc = rundb_open(&r->db, cfg->run.db, 0, err);
        char hash[17];
        rundb_run_hash(cfg, hash);
        if (!rc) rc = rundb_reap(r->db, 600, err) < 0 ? err->code : ML_OK;
        if (!rc) rc = rundb_add_experiment(r->db, cfg->run.experiment, "", "", err);
        /* a resumed run keeps its row; a fresh run with an existing id replaces nothing: add_run decides */
        if (!rc && resume_step < 0)
            rc = rundb_add_run(r->db, r->id, cfg->run.experiment, cfg->run.name[0] ? cfg->run.name : r->id, cfg,
                               config_text ? config_text : "", hash, cfg->run.dir, m->be->name, 1, err);
        if (!rc && resume_step >= 0) {
            /* a run resumed without a row (its database was moved) gets one */
            ml_err ignore;
            rundb_add_run(r->db, r->id, cfg->run.experiment, cfg->run.name[0] ? cfg->run.name : r->id, cfg,
                          config_text ? config_text : "", hash, cfg->run.dir, m->be->name, 1, &ignore);
        }
        if (!rc) rc = rundb_set_status(r->db, r->id, "running", NULL, err);
        if (!rc && r->trace) {
            snprintf(path, sizeof path, "%s/trace.h5", cfg->run.dir);
            rc = rundb_set_trace_path(r->db, r->id, path, err);
        }
    }
    free(config_text);
    if (rc) {
        ml_err ignore;
        recorder_close(r, NULL, NULL, &ignore);
    }
    return rc;
}

static void fill_routing(ml_recorder *r, const ml_model *m, const ml_route_stats *st) {
    const int L = r->L, E = r->E;
    const double per_micro = st->micro_batches > 0 ? 1.0 / st->micro_batches : 0;
    for (int l = 0; l < L; l++) {
        r->topk[l] = m->layer_k[l];
        r->dropped[l] = (int32_t)st->dropped[l];
        r->policy_loss[l] = (float)(st->policy_loss[l] * per_micro);
        for (int e = 0; e < E && m->E; e++) {
            size_t i = (size_t)l * E + e;
            r->load[i] = (int32_t)st->tokens_per_expert[i];
            r->selected[i] = (int32_t)st->selected[i];
            r->gate_mean[i] = (float)(st->gate_mean_sum[i] * per_micro);
        }
    }
}

int recorder_step(ml_recorder *r, const ml_config *cfg, const ml_model *m, int64_t step, uint64_t tokens, float loss,
                  float lr, float grad_norm, ml_err *err) {
    if (!r->trace || step % cfg->trace.every) return ML_OK;
    fill_routing(r, m, &m->stats);
    if (m->E) m->be->to_host(r->bias, m->router_bias, sizeof(float) * r->L * r->E);
    ml_trace_row row = {.step = step, .tokens = (int64_t)tokens, .loss = loss, .lr = lr, .grad_norm = grad_norm,
                        .policy_loss = r->policy_loss, .load = r->load, .selected = r->selected,
                        .gate_mean = r->gate_mean, .bias = r->bias, .topk = r->topk, .dropped = r->dropped};
    return trace_append(r->trace, &row, err);
}

int recorder_eval(ml_recorder *r, const ml_model *m, int64_t step, float val_loss, ml_err *err) {
    if (!r->trace) return ML_OK;
    fill_routing(r, m, &m->eval_stats);
    return trace_append_eval(r->trace, step, val_loss, r->load, r->gate_mean, err);
}

int recorder_metrics(ml_recorder *r, int64_t step, int n, const char *const *keys, const double *values, ml_err *err) {
    if (!r->db) return ML_OK;
    int rc = rundb_log_metrics(r->db, r->id, step, n, keys, values, err);
    return rc ? rc : rundb_heartbeat(r->db, r->id, err);
}

int recorder_summary(ml_recorder *r, const char *key, double value, ml_err *err) {
    return r->db ? rundb_set_summary(r->db, r->id, key, value, err) : ML_OK;
}

int recorder_flush(ml_recorder *r, ml_err *err) { return r->trace ? trace_flush(r->trace, err) : ML_OK; }

int recorder_close(ml_recorder *r, const char *status, const char *error, ml_err *err) {
    int rc = ML_OK;
    if (r->trace) rc = trace_close(r->trace, err);
    r->trace = NULL;
    if (r->db) {
        if (status && !rc) rc = rundb_set_status(r->db, r->id, status, error, err);
        else if (status) rundb_set_status(r->db, r->id, "failed", err->msg, NULL);
        rundb_close(r->db);
    }
    r->db = NULL;
    free(r->load), free(r->selected), free(r->topk), free(r->dropped), free(r->gate_mean), free(r->bias);
    free(r->policy_loss);
    r->load = r->selected = r->topk = r->dropped = NULL;
    r->gate_mean = r->bias = r->policy_loss = NULL;
    return rc;
}
