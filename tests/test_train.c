/* test_train.c: training on the real corpus. (1) tiny for 600 steps (0.6M tokens) brings the validation loss well
 * below the unigram entropy of the validation tokens; (2) N steps straight equal N/2 + checkpoint + resume + N/2
 * bit for bit; (3) gradient accumulation of 2 x B/2 equals one batch of B; (4) the NaN guard stops with
 * ML_ERUN and leaves the last good checkpoint untouched. argv[1] = token folder (data/tokens/vocab8192). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "config.h"
#include "dataloader.h"
#include "model.h"
#include "shard.h"
#include "train.h"

#include "check.h"

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc(*n ? *n : 1);
    if (fread(b, 1, *n, f) != *n) *n = 0;
    fclose(f);
    return b;
}

static int same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = x && y && na == nb && !memcmp(x, y, na);
    free(x), free(y);
    return same;
}

static void base_config(ml_config *c, const char *data, const char *run, int steps) {
    config_preset(c, "tiny", NULL);
    snprintf(c->data.dir, sizeof c->data.dir, "%s", data);
    snprintf(c->run.dir, sizeof c->run.dir, "%s", run);
    c->train.steps = steps;
    c->train.eval_every = 0;
    c->train.eval_batches = 4;
    c->run.db[0] = 0; /* no run database: these runs test training, not bookkeeping */
}

/* Entropy (nats) of the empirical unigram distribution of a shard's tokens. */
static double unigram_entropy(const char *path) {
    ml_shard s;
    ml_err err;
    if (shard_open(&s, path, &err)) return NAN;
    uint32_t vmax = 0;
    for (size_t i = 0; i < s.ntokens; i++) vmax = shard_token(&s, i) > vmax ? shard_token(&s, i) : vmax;
    double *count = calloc(vmax + 1, sizeof(double)), h = 0;
    for (size_t i = 0; i < s.ntokens; i++) count[shard_token(&s, i)]++;
    for (uint32_t v = 0; v <= vmax; v++)
        if (count[v] > 0) h -= count[v] / s.ntokens * log(count[v] / s.ntokens);
    free(count);
    shard_close(&s);
    return h;
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : "data/tokens/vocab8192";
    char path[1200], tmp[] = "/tmp/moelab_train_XXXXXX";
    snprintf(path, sizeof path, "%s/val.bin", data);
    if (access(path, R_OK)) {
        printf("FAIL: %s is missing: run `moelab data prepare` first\n", path);
        return 1;
    }
    if (!mkdtemp(tmp)) return 1;
    ml_err err = {0};
    ml_train_opts quiet = {.quiet = 1};
    ml_train_result res;
    ml_config c;
    char run[400], run2[400], ck1[500], ck2[500];

    /* (1) learning on real text */
    double h = unigram_entropy(path);
    snprintf(run, sizeof run, "%s/learn", tmp);
    base_config(&c, data, run, 600);
    int rc = train_run(&c, &quiet, &res, &err);
    CHECK(rc == 0, "tiny run failed: %s", err.msg);
    printf("tiny, 600 steps: val loss %.4f nats; unigram entropy of the validation tokens %.4f nats\n",
           res.val_loss, h);
    CHECK(res.val_loss < h - 0.5, "val loss %.4f is not well below the unigram entropy %.4f (margin 0.5 nats)",
          res.val_loss, h);

    /* (2) bit-exact resume */
    snprintf(run, sizeof run, "%s/straight", tmp);
    snprintf(run2, sizeof run2, "%s/halves", tmp);
    base_config(&c, data, run, 40);
    c.train.eval_every = 10;
    CHECK(train_run(&c, &quiet, &res, &err) == 0, "straight run: %s", err.msg);
    base_config(&c, data, run2, 40);
    c.train.eval_every = 10;
    ml_train_opts half = {.quiet = 1, .stop_after = 20};
    CHECK(train_run(&c, &half, &res, &err) == 0 && res.steps == 20, "first half: %s", err.msg);
    snprintf(c.run.resume, sizeof c.run.resume, "%s/checkpoint.bin", run2);
    CHECK(train_run(&c, &quiet, &res, &err) == 0 && res.steps == 40, "second half: %s", err.msg);
    snprintf(ck1, sizeof ck1, "%s/checkpoint.bin", run);
    snprintf(ck2, sizeof ck2, "%s/checkpoint.bin", run2);
    CHECK(same_file(ck1, ck2), "40 straight steps differ from 20 + resume + 20");

    /* (3) accumulation: 2 micro-batches of B/2 = one batch of B (same tokens; no per-micro-batch aux loss) */
    {
        ml_model a, b;
        ml_config ca, cb;
        base_config(&ca, data, run, 1);
        ca.balance.aux_coef = 0;
        cb = ca;
        ca.train.batch = 8;
        cb.train.batch = 4, cb.train.accum = 2;
        ml_loader la, lb;
        snprintf(path, sizeof path, "%s/train.bin", data);
        CHECK(loader_open(&la, path, 8, ca.model.seq_len, ca.model.vocab, &err) == 0, "%s", err.msg);
        CHECK(loader_open(&lb, path, 4, cb.model.seq_len, cb.model.vocab, &err) == 0, "%s", err.msg);
        model_init(&a, &ca, backend_cpu(), 8, 0, &err);
        model_init(&b, &cb, backend_cpu(), 4, 0, &err);
        model_init_weights(&a, 5, NULL);
        model_init_weights(&b, 5, NULL);
        model_zero_grad(&a), model_zero_grad(&b);
        loader_next(&la);
        float la_loss = model_forward(&a, la.inputs, la.targets);
        model_backward(&a, 1.0f);
        float lb_loss = 0;
        for (int i = 0; i < 2; i++) {
            loader_next(&lb);
            lb_loss += model_forward(&b, lb.inputs, lb.targets) / 2;
            model_backward(&b, 0.5f);
        }
        double num = 0, den = 0;
        for (size_t i = 0; i < a.nparams; i++)
            num += (a.grads[i] - b.grads[i]) * (double)(a.grads[i] - b.grads[i]), den += a.grads[i] * (double)a.grads[i];
        CHECK(fabsf(la_loss - lb_loss) < 1e-5f * la_loss, "accumulated loss %.7f vs batch loss %.7f", lb_loss, la_loss);
        CHECK(sqrt(num / den) < 1e-5, "accumulated gradient differs: relative L2 %.3g", sqrt(num / den));
        model_free(&a), model_free(&b);
        loader_close(&la), loader_close(&lb);
    }

    /* (4) NaN guard: a huge learning rate blows up; the checkpoint from before stays as it was */
    snprintf(run, sizeof run, "%s/nan", tmp);
    base_config(&c, data, run, 40);
    ml_train_opts ten = {.quiet = 1, .stop_after = 10};
    CHECK(train_run(&c, &ten, &res, &err) == 0, "%s", err.msg);
    snprintf(ck1, sizeof ck1, "%s/checkpoint.bin", run);
    snprintf(ck2, sizeof ck2, "%s/before.bin", tmp);
    size_t n;
    char *before = slurp(ck1, &n);
    FILE *f = fopen(ck2, "wb");
    fwrite(before, 1, n, f);
    fclose(f);
    free(before);
    snprintf(c.run.resume, sizeof c.run.resume, "%s", ck1);
    c.train.lr = 1e30f, c.train.grad_clip = 0, c.train.ckpt_every = 0;
    rc = train_run(&c, &quiet, &res, &err);
    CHECK(rc == ML_ERUN && strstr(err.msg, "not finite"), "NaN guard: rc=%d '%s'", rc, err.msg);
    CHECK(same_file(ck1, ck2), "the last good checkpoint was overwritten");

    char cmd[1400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd)) printf("warning: could not remove %s\n", tmp);
    printf("train: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
