/* test_balance.c: the load-balancing policies and the imbalance metrics.
 *  - every loss term's gradient (aux, seq, global with running counts, top1, z) against central finite
 *    differences through the router (softmax and sigmoid scores); the device form of each (value from
 *    the backend's reduced statistics, gradient from its backward ops) against its own loss;
 *  - loss_free: on a router with fixed skewed logits the bias updates bring MaxVio under 0.05 within a stated
 *    number of updates while the gates stay the unbiased scores; in training the update happens once per
 *    global batch, not per micro-batch;
 *  - topk_schedule: k changes exactly at the stage boundary; bad stage strings are rejected naming the key;
 *  - capacity: exact drops on handcrafted routing for both drop policies;
 *  - metrics: handcrafted loads with values computed by hand;
 *  - every policy in a short small-cpu run: loads sum to tokens * k minus drops.
 * argv[1] = token folder (data/tokens/vocab8192). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "balance/policy.h"
#include "config.h"
#include "dataloader.h"
#include "metrics.h"
#include "model.h"
#include "ops_cpu.h"
#include "rng.h"
#include "train.h"

#include "check.h"
#define NEAR(a, b, tol) (fabs((double)(a) - (double)(b)) <= (tol))

/* ---------------------------------------------------------------- loss gradients */

enum { GM = 12, GE = 6, GB = 3, GT = 4 }; /* M = B * T tokens */

typedef struct {
    const ml_policy *policy;
    ml_config cfg;
    ml_router_params rp;
    int64_t running_before[GE]; /* choices of earlier micro-batches (global_aux_loss) */
    int64_t tokens_before;
} grad_case;

/* Routes logits and returns the policy's loss; with dlogits_out, also its full gradient w.r.t. the logits
 * (the direct dlogits plus dscores carried through the score function). idx_out receives the choices. */
static double policy_objective(const grad_case *g, const float *logits, float *dlogits_out, int32_t *idx_out) {
    const int M = GM, E = GE, k = g->rp.k;
    float scores[GM * GE], gate[GM * 4], dscores[GM * GE] = {0}, dlogits[GM * GE] = {0};
    int32_t idx[GM * 4], selected[GE] = {0};
    int64_t running[GE];
    router_forward(scores, idx, gate, logits, NULL, M, &g->rp);
    for (int i = 0; i < M * k; i++) selected[idx[i]]++;
    for (int e = 0; e < E; e++) running[e] = g->running_before[e] + selected[e];
    ml_balance_layer x = {.layer = 0, .M = M, .E = E, .k = k, .B = GB, .T = GT, .logits = logits, .scores = scores,
                          .idx = idx, .selected = selected, .running_selected = running,
                          .running_tokens = g->tokens_before + M, .dscores = dscores, .dlogits = dlogits};
    double L = g->policy->loss(&g->cfg, &x);
    if (dlogits_out) {
        float dgate[GM * 4] = {0};
        memcpy(dlogits_out, dlogits, sizeof dlogits);
        router_backward(dlogits_out, dgate, dscores, logits, scores, idx, gate, M, &g->rp);
    }
    if (idx_out) memcpy(idx_out, idx, sizeof(int32_t) * M * k);
    return L;
}

static void check_loss_gradient(const char *policy, int score, int k, uint64_t seed) {
    grad_case g = {0};
    g.policy = policy_find(policy);
    config_preset(&g.cfg, "tiny", NULL);
    g.cfg.balance.aux_coef = 0.1f, g.cfg.balance.z_coef = 0.05f, g.cfg.balance.top1_coef = 0.1f;
    g.cfg.balance.top1_tau = 0.5f;
    g.rp = (ml_router_params){.E = GE, .k = k, .score = score, .norm_topk = 0, .route_scale = 1};
    ml_rng rng;
    rng_seed(&rng, seed);
    for (int e = 0; e < GE; e++) g.running_before[e] = (int64_t)(rng_next(&rng) % 20);
    g.tokens_before = 0;
    for (int e = 0; e < GE; e++) g.tokens_before += g.running_before[e];
    g.tokens_before /= k;
    float logits[GM * GE], grad[GM * GE];
    for (int i = 0; i < GM * GE; i++) logits[i] = (float)rng_normal(&rng);
    int32_t idx0[GM * 4], idx1[GM * 4], idx2[GM * 4];
    policy_objective(&g, logits, grad, idx0);
    double gmax = 0, worst = 0;
    for (int i = 0; i < GM * GE; i++) gmax = fmax(gmax, fabs(grad[i]));
    int skipped = 0;
    const float h = 1e-3f;
    for (int i = 0; i < GM * GE; i++) {
        float save = logits[i];
        logits[i] = save + h;
        double lp = policy_objective(&g, logits, NULL, idx1);
        logits[i] = save - h;
        double lm = policy_objective(&g, logits, NULL, idx2);
        logits[i] = save;
        if (memcmp(idx1, idx0, sizeof(int32_t) * GM * k) || memcmp(idx2, idx0, sizeof(int32_t) * GM * k)) {
            skipped++; /* the perturbation flipped a choice: the loss is not differentiable there */
            continue;
        }
        double num = (lp - lm) / (2.0 * h);
        worst = fmax(worst, fabs(num - grad[i]));
    }
    /* float inputs, double loss: rounding ~ 6e-8 / h relative; tolerance 1e-3 of the largest gradient */
    CHECK(gmax > 0 && worst <= 1e-3 * gmax + 1e-7 && skipped < GM * GE / 4,
          "%s (%s, k=%d): worst |numeric - analytic| %.3g vs max gradient %.3g, %d coordinates skipped", policy,
          score == SCORE_SIGMOID ? "sigmoid" : "softmax", k, worst, gmax, skipped);
    printf("gradient %-16s %-7s k=%d: worst error %.2e of max %.2e (%d flips skipped)\n", policy,
           score == SCORE_SIGMOID ? "sigmoid" : "softmax", k, worst, gmax, skipped);
}

/* The device form of a loss (value from the statistics the backend reduced, gradient from its backward ops:
 * what the model uses when no policy needs the scores on the host) equals the policy's own loss and
 * gradient, computed on host copies. The CPU backend's ops stand in for any backend's here; test_gpu_ops
 * compares the CUDA ops with them. */
static void check_device_form(const char *policy, int k, uint64_t seed) {
    const ml_backend *be = backend_cpu();
    const ml_policy *p = policy_find(policy);
    ml_config cfg;
    config_preset(&cfg, "tiny", NULL);
    cfg.balance.aux_coef = 0.07f, cfg.balance.z_coef = 0.03f, cfg.balance.top1_coef = 0.05f;
    snprintf(cfg.balance.policy, sizeof cfg.balance.policy, "%s", policy);
    ml_balance bal;
    ml_err err;
    CHECK(balance_init(&bal, &cfg, &err) == 0 && !bal.has_host_loss, "%s: no device form (%s)", policy, err.msg);
    ml_rng rng;
    rng_seed(&rng, seed);
    const int M = GM, E = GE, B = GB, T = GT;
    float logits[GM * GE], scores[GM * GE], gate[GM * 2], dscores[GM * GE] = {0}, dlogits[GM * GE] = {0};
    float dprobs[GM * GE] = {0}, drlogits[GM * GE] = {0}, gf[GB * GE + GE];
    int32_t idx[GM * 2], seq_sel[GB * GE], selected[GE] = {0};
    int64_t running[GE];
    double psum[GB * GE], seq_mean[GB * GE], mean[GE] = {0}, g[GB * GE + GE], zsum, fsum[GE], ssum, a;
    for (int i = 0; i < M * E; i++) logits[i] = (float)(2 * rng_normal(&rng));
    ml_router_params rp = {.E = E, .k = k, .score = SCORE_SOFTMAX, .route_scale = 1};
    router_forward(scores, idx, gate, logits, NULL, M, &rp);
    be->route_stats(psum, seq_sel, scores, idx, M, k, E, T);
    be->zloss_forward(&zsum, logits, M, E);
    be->tempered_forward(fsum, &ssum, logits, scores, idx, cfg.balance.top1_tau, M, k, E);
    for (int i = 0; i < B * E; i++)
        seq_mean[i] = psum[i] / T, mean[i % E] += psum[i] / M, selected[i % E] += seq_sel[i];
    for (int e = 0; e < E; e++) running[e] = selected[e] + 3 * e;
    ml_balance_layer x = {.layer = 0, .M = M, .E = E, .k = k, .B = B, .T = T, .logits = logits, .scores = scores,
                          .idx = idx, .selected = selected, .running_selected = running,
                          .running_tokens = M + 3 * 15 / k, .dscores = dscores, .dlogits = dlogits,
                          .score_mean = mean, .seq_selected = seq_sel, .seq_score_mean = seq_mean,
                          .tempered_fsum = fsum, .tempered_ssum = ssum};
    const double want = p->loss(&cfg, &x), got = balance_device_loss(&bal, &cfg, &x, zsum, g, g + B * E, &a);
    for (int i = 0; i < B * E + E; i++) gf[i] = (float)g[i];
    if (bal.has_lbl) be->lbl_backward(dprobs, scores, gf, 1.0f / T, M, E, T);
    if (bal.z_coef > 0) be->zloss_backward(drlogits, logits, (float)(2 * bal.z_coef / M), M, E);
    if (bal.tempered)
        be->tempered_backward(drlogits, dprobs, logits, idx, gf + B * E, 1, (float)a, cfg.balance.top1_tau, M, k, E);
    double worst = 0, dmax = 0;
    for (int i = 0; i < M * E; i++) {
        worst = fmax(worst, fmax(fabs(dprobs[i] - dscores[i]), fabs(drlogits[i] - dlogits[i])));
        dmax = fmax(dmax, fmax(fabs(dscores[i]), fabs(dlogits[i])));
    }
    /* top1_loss's host form takes float exponentials (~1e-7); the rest agree to double rounding */
    const double tol = strcmp(policy, "top1_loss") ? 1e-12 : 1e-7;
    CHECK(want > 0 && NEAR(got, want, tol * fabs(want)), "%s k=%d device form: value %.17g vs loss %.17g", policy, k,
          got, want);
    CHECK(dmax > 0 && worst <= 1e-5 * dmax, "%s k=%d device form: gradient vs the loss's, worst %.3g of %.3g", policy,
          k, worst, dmax);
}

/* A whole training step (small-cpu, gradient accumulation over 3 micro-batches) with every loss and cap in its
 * device form and again on host copies (MOELAB_HOST_POLICIES=1): the same balancing losses, the same routing
 * and drops (capacity factor 1) and the same gradients within float rounding. */
static void check_forms_in_model(const char *data, const char *policy) {
    char path[600];
    snprintf(path, sizeof path, "%s/train.bin", data);
    float aux[2] = {0}, *grads[2] = {NULL, NULL};
    int64_t load[2][64] = {{0}}, dropped[2] = {0};
    size_t n = 0;
    for (int form = 0; form < 2; form++) {
        if (form) setenv("MOELAB_HOST_POLICIES", "1", 1);
        ml_config c;
        ml_err err = {0};
        config_preset(&c, "small-cpu", NULL);
        c.train.batch = 2;
        snprintf(c.balance.policy, sizeof c.balance.policy, "%s", policy);
        c.balance.capacity_factor = 1.0f;
        ml_model m;
        ml_loader d;
        int ok = !model_init(&m, &c, backend_cpu(), 2, 0, &err) &&
                 !loader_open(&d, path, 2, c.model.seq_len, c.model.vocab, &err);
        unsetenv("MOELAB_HOST_POLICIES");
        CHECK(ok && m.balance.has_host_loss == (form && m.balance.has_loss) &&
                  m.balance.has_host_cap == (form && m.balance.has_cap), "%s form %d: %s", policy, form, err.msg);
        if (!ok) return;
        model_init_weights(&m, 3, NULL);
        model_begin_step(&m, 0);
        model_zero_grad(&m);
        for (int micro = 0; micro < 3; micro++) {
            loader_next(&d);
            model_forward(&m, d.inputs, d.targets);
            aux[form] += m.last_aux;
            model_backward(&m, 1.0f / 3);
        }
        for (int i = 0; i < m.L * m.E && i < 64; i++) load[form][i] = m.stats.tokens_per_expert[i];
        for (int l = 0; l < m.L; l++) dropped[form] += m.stats.dropped[l];
        n = m.nparams;
        grads[form] = malloc(sizeof(float) * n);
        memcpy(grads[form], m.grads, sizeof(float) * n);
        loader_close(&d);
        model_free(&m);
    }
    double worst = 0, gmax = 0;
    for (size_t i = 0; i < n; i++)
        worst = fmax(worst, fabs(grads[0][i] - grads[1][i])), gmax = fmax(gmax, fabs(grads[1][i]));
    CHECK(NEAR(aux[0], aux[1], 1e-5 * aux[1]), "%s: balancing losses device %.9g host %.9g", policy, aux[0], aux[1]);
    CHECK(strstr(policy, "capacity") ? dropped[1] > 0 : aux[1] > 0, "%s: nothing to compare", policy);
    CHECK(!memcmp(load[0], load[1], sizeof load[0]) && dropped[0] == dropped[1],
          "%s: the same loads (and %lld / %lld drops) with both forms", policy, (long long)dropped[0],
          (long long)dropped[1]);
    CHECK(worst <= 1e-5 * gmax, "%s: gradients of a 3-micro-batch step differ by %.3g (largest %.3g)", policy, worst,
          gmax);
    free(grads[0]), free(grads[1]);
}

/* ---------------------------------------------------------------- loss_free */

static double maxvio_of(const int32_t *counts, int E) {
    double loads[64];
    for (int e = 0; e < E; e++) loads[e] = counts[e];
    ml_load_metrics mt;
    metrics_compute(&mt, loads, E);
    return mt.maxvio;
}

static void check_loss_free_router(int score, int updates_allowed) {
    enum { M = 4096, E = 16 };
    ml_config cfg;
    config_preset(&cfg, "tiny", NULL);
    cfg.balance.bias_rate = 1e-3f;
    const ml_policy *lf = policy_find("loss_free");
    ml_router_params rp = {.E = E, .k = 1, .score = score, .route_scale = 1};
    float *logits = malloc(sizeof(float) * M * E), *probs = malloc(sizeof(float) * M * E), gate[M], bias[E] = {0};
    int32_t idx[M], counts[E];
    ml_rng rng;
    rng_seed(&rng, 11);
    /* skewed: expert e's logits are shifted by 1.5 * e / E, so high experts win far more often */
    for (int m = 0; m < M; m++)
        for (int e = 0; e < E; e++) logits[(size_t)m * E + e] = (float)(0.5 * rng_normal(&rng) + 1.5 * e / E);
    ml_route_stats st;
    route_stats_alloc(&st, 1, E);
    int layer_k[1] = {1}, reached = -1;
    double first = 0, v = 0;
    for (int u = 0; u <= updates_allowed; u++) {
        router_forward(probs, idx, gate, logits, bias, M, &rp);
        memset(counts, 0, sizeof counts);
        for (int m = 0; m < M; m++) counts[idx[m]]++;
        v = maxvio_of(counts, E);
        if (u == 0) first = v;
        if (v < 0.05) {
            reached = u;
            break;
        }
        route_stats_reset(&st);
        for (int e = 0; e < E; e++) st.tokens_per_expert[e] = counts[e];
        lf->after_step(&cfg, &st, layer_k, bias);
    }
    int gates_unbiased = 1;
    for (int m = 0; m < M; m++) gates_unbiased &= gate[m] == probs[(size_t)m * E + idx[m]];
    printf("loss_free (%s): MaxVio %.3f -> %.3f after %d updates (allowed %d)\n",
           score == SCORE_SIGMOID ? "sigmoid" : "softmax", first, v, reached, updates_allowed);
    CHECK(first > 0.5, "the skewed router should start unbalanced (MaxVio %.3f)", first);
    CHECK(reached >= 0, "MaxVio still %.3f after %d bias updates", v, updates_allowed);
    CHECK(gates_unbiased, "a gate included the bias");
    route_stats_free(&st);
    free(logits), free(probs);
}

/* ---------------------------------------------------------------- topk_schedule */

static void check_schedule(void) {
    ml_config c;
    ml_err err = {0};
    config_preset(&c, "tiny", NULL);
    snprintf(c.balance.policy, sizeof c.balance.policy, "aux_loss+topk_schedule");
    snprintf(c.balance.topk_stages, sizeof c.balance.topk_stages,
             "[{layers: \"[3]*1+[2]*1\", until_tokens: 3000}, {layers: [2,1], until_tokens: 6e3}, {layers: \"[1]*2\"}]");
    CHECK(config_validate(&c, &err) == 0, "valid stages rejected: %s", err.msg);
    CHECK(balance_max_k(&c) == 3, "max k over the stages is %d, want 3", balance_max_k(&c));
    ml_balance b;
    balance_init(&b, &c, &err);
    int k[ML_MAX_LAYERS];
    const struct { uint64_t tokens; int k0, k1; } want[] = {{0, 3, 2}, {2999, 3, 2}, {3000, 2, 1}, {5999, 2, 1},
                                                             {6000, 1, 1}, {1u << 30, 1, 1}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        balance_choose_k(&b, &c, want[i].tokens, k);
        CHECK(k[0] == want[i].k0 && k[1] == want[i].k1, "after %llu tokens k = [%d,%d], want [%d,%d]",
              (unsigned long long)want[i].tokens, k[0], k[1], want[i].k0, want[i].k1);
    }
    const char *bad[] = {"", "[{layers: \"[1]*3\"}]", "[{layers: \"[9]*2\"}]", "[{layers: \"[1]*2\", until_tokens: 5}]",
                         "[{layers: \"[2]*2\", until_tokens: 9}, {layers: \"[1]*2\", until_tokens: 5}, {layers: \"[1]*2\"}]",
                         "[{layers: \"[2]*x\"}]", "[{layers: \"[1]*2\", speed: 3}]", "{layers: \"[1]*2\"}",
                         "[{until_tokens: 5}, {layers: \"[1]*2\"}]", "[{layers: \"[1]*2\"}] extra"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(c.balance.topk_stages, sizeof c.balance.topk_stages, "%s", bad[i]);
        int rc = config_validate(&c, &err);
        CHECK(rc == ML_EINPUT && strstr(err.msg, "balance.topk_stages"), "stages '%s' not rejected by key: rc=%d '%s'",
              bad[i], rc, err.msg);
    }
    snprintf(c.balance.policy, sizeof c.balance.policy, "aux_loss+bogus");
    CHECK(config_validate(&c, &err) == ML_EINPUT && strstr(err.msg, "balance.policy: unknown policy 'bogus'"),
          "unknown policy: '%s'", err.msg);
    snprintf(c.balance.policy, sizeof c.balance.policy, "aux_loss+aux_loss");
    CHECK(config_validate(&c, &err) == ML_EINPUT && strstr(err.msg, "named twice"), "duplicate policy: '%s'", err.msg);
    snprintf(c.balance.policy, sizeof c.balance.policy, "none+z_loss");
    CHECK(config_validate(&c, &err) == ML_EINPUT && strstr(err.msg, "'none'"), "none combined: '%s'", err.msg);
}

/* ---------------------------------------------------------------- capacity */

static void check_capacity(void) {
    ml_config c;
    config_preset(&c, "tiny", NULL);
    c.balance.capacity_factor = 1.0f;
    const ml_policy *cap = policy_find("capacity");
    /* k = 1, E = 2, M = 6: C = ceil(1 * 6 * 1 / 2) = 3. Expert 0 gets tokens 0,1,2,4,5, expert 1 token 3. */
    enum { M = 6, E = 2 };
    float scores[M * E] = {0.9f, 0.1f, 0.6f, 0.4f, 0.7f, 0.3f, 0.2f, 0.8f, 0.95f, 0.05f, 0.55f, 0.45f};
    int32_t idx[M] = {0, 0, 0, 1, 0, 0}, route[M];
    ml_balance_layer x = {.M = M, .E = E, .k = 1, .scores = scores, .idx = idx};
    c.balance.drop_policy = DROP_POSITION;
    memcpy(route, idx, sizeof route);
    cap->cap(&c, &x, route);
    const int32_t want_pos[M] = {0, 0, 0, 1, -1, -1};
    CHECK(!memcmp(route, want_pos, sizeof route), "position: route %d %d %d %d %d %d", route[0], route[1], route[2],
          route[3], route[4], route[5]);
    c.balance.drop_policy = DROP_PROBS; /* expert 0's scores: 0.9, 0.6, 0.7, 0.95, 0.55: keep tokens 0, 2, 4 */
    memcpy(route, idx, sizeof route);
    cap->cap(&c, &x, route);
    const int32_t want_probs[M] = {0, -1, 0, 1, 0, -1};
    CHECK(!memcmp(route, want_probs, sizeof route), "probs: route %d %d %d %d %d %d", route[0], route[1], route[2],
          route[3], route[4], route[5]);
    /* k = 2, E = 3, M = 3, factor 0.5: C = ceil(0.5 * 3 * 2 / 3) = 1 */
    enum { M2 = 3, E2 = 3 };
    float s2[M2 * E2] = {0.5f, 0.3f, 0.2f, 0.6f, 0.1f, 0.3f, 0.2f, 0.7f, 0.1f};
    int32_t idx2[M2 * 2] = {0, 1, 0, 2, 1, 0}, r2[M2 * 2];
    ml_balance_layer x2 = {.M = M2, .E = E2, .k = 2, .scores = s2, .idx = idx2};
    c.balance.capacity_factor = 0.5f;
    c.balance.drop_policy = DROP_POSITION;
    memcpy(r2, idx2, sizeof r2);
    cap->cap(&c, &x2, r2);
    const int32_t want2[M2 * 2] = {0, 1, -1, 2, -1, -1};
    CHECK(!memcmp(r2, want2, sizeof r2), "k=2 position: %d %d %d %d %d %d", r2[0], r2[1], r2[2], r2[3], r2[4], r2[5]);
    c.balance.drop_policy = DROP_PROBS; /* expert 0: scores 0.5 (t0), 0.6 (t1), 0.2 (t2): keep t1 */
    memcpy(r2, idx2, sizeof r2);
    cap->cap(&c, &x2, r2);
    const int32_t want3[M2 * 2] = {-1, -1, 0, 2, 1, -1}; /* expert 1: 0.3 (t0) vs 0.7 (t2): keep t2 */
    CHECK(!memcmp(r2, want3, sizeof r2), "k=2 probs: %d %d %d %d %d %d", r2[0], r2[1], r2[2], r2[3], r2[4], r2[5]);
}

/* The device form of capacity (the backend's capacity_route on a dispatch of the choices) drops exactly what
 * the policy's cap drops, on random choices with many tied scores, for both drop policies and several
 * factors (including one that drops nothing). */
static void check_capacity_form(void) {
    enum { M = 300, E = 7, k = 2 };
    const ml_backend *be = backend_cpu();
    const ml_policy *p = policy_find("capacity");
    ml_config c;
    config_preset(&c, "tiny", NULL);
    ml_rng rng;
    rng_seed(&rng, 77);
    float scores[M * E];
    int32_t idx[M * k], want[M * k], got[M * k], counts[E], offsets[E + 1], slot[M * k];
    for (int i = 0; i < M * E; i++) scores[i] = (float)(rng_next(&rng) % 5) / 4; /* 5 values: ties */
    for (int m = 0; m < M; m++) {
        idx[m * k] = (int32_t)(rng_next(&rng) % 3); /* experts 0-2 over-full, 6 never chosen */
        idx[m * k + 1] = 3 + (int32_t)(rng_next(&rng) % 3);
    }
    be->moe_dispatch(counts, offsets, slot, idx, M, k, E);
    const float factors[] = {0.3f, 1.0f, 2.5f};
    for (int f = 0; f < 3; f++)
        for (int drop = 0; drop < 2; drop++) {
            c.balance.capacity_factor = factors[f], c.balance.drop_policy = drop ? DROP_POSITION : DROP_PROBS;
            ml_balance_layer x = {.M = M, .E = E, .k = k, .scores = scores, .idx = idx};
            memcpy(want, idx, sizeof want);
            p->cap(&c, &x, want);
            int by_score, dropped = 0;
            const int cap = p->cap_limit(&c, &x, &by_score);
            be->capacity_route(got, idx, scores, offsets, slot, cap, by_score, M, k, E);
            for (int i = 0; i < M * k; i++) dropped += want[i] < 0;
            CHECK(!memcmp(want, got, sizeof want) && by_score == !drop && (f == 2 ? dropped == 0 : dropped > 0),
                  "capacity_route vs cap (factor %.1f, %s): %d dropped", factors[f], drop ? "position" : "probs",
                  dropped);
        }
}

/* ---------------------------------------------------------------- metrics */

static void check_metrics(void) {
    ml_load_metrics mt;
    const double a[4] = {1, 2, 3, 4};
    metrics_compute(&mt, a, 4);
    CHECK(NEAR(mt.total, 10, 1e-12) && NEAR(mt.maxvio, 0.6, 1e-12) && NEAR(mt.max_dev, 0.6, 1e-12) &&
              NEAR(mt.min_dev, -0.6, 1e-12), "maxvio/min/max deviation of 1,2,3,4");
    CHECK(NEAR(mt.cv, sqrt(1.25) / 2.5, 1e-12), "cv %.6f", mt.cv);
    double h = -(0.1 * log(0.1) + 0.2 * log(0.2) + 0.3 * log(0.3) + 0.4 * log(0.4)) / log(4.0);
    CHECK(NEAR(mt.entropy, h, 1e-12), "entropy %.6f want %.6f", mt.entropy, h);
    CHECK(NEAR(mt.gini, 0.25, 1e-12), "gini %.6f want 0.25", mt.gini);
    CHECK(mt.dead == 0 && NEAR(mt.top20_share, 0.4, 1e-12) && NEAR(mt.bottom20_share, 0.1, 1e-12), "20%% shares");
    const double b[4] = {0, 0, 0, 8};
    metrics_compute(&mt, b, 4);
    CHECK(NEAR(mt.maxvio, 3, 1e-12) && mt.dead == 3 && NEAR(mt.gini, 0.75, 1e-12) && NEAR(mt.entropy, 0, 1e-12) &&
              NEAR(mt.min_dev, -1, 1e-12), "collapsed layer 0,0,0,8");
    const double u[5] = {7, 7, 7, 7, 7};
    metrics_compute(&mt, u, 5);
    CHECK(NEAR(mt.maxvio, 0, 1e-12) && NEAR(mt.cv, 0, 1e-12) && NEAR(mt.entropy, 1, 1e-12) && NEAR(mt.gini, 0, 1e-12),
          "uniform layer");
    const int rank[4] = {0, 0, 1, 1};
    CHECK(NEAR(metrics_overload_factor(a, 4, rank, 2), 1.4, 1e-12), "overload factor");
    CHECK(NEAR(metrics_drop_fraction(90, 10), 0.1, 1e-12) && metrics_drop_fraction(0, 0) == 0, "drop fraction");
}

/* ---------------------------------------------------------------- policies in the model */

static void check_policies_in_model(const char *data) {
    const char *policies[] = {"none", "aux_loss", "seq_aux_loss", "global_aux_loss", "top1_loss", "z_loss",
                              "loss_free", "capacity", "forced_balance", "aux_loss+z_loss+topk_schedule"};
    char path[600];
    snprintf(path, sizeof path, "%s/train.bin", data);
    for (size_t i = 0; i < sizeof policies / sizeof policies[0]; i++) {
        ml_config c;
        ml_err err = {0};
        config_preset(&c, "small-cpu", NULL);
        c.train.batch = 2, c.train.accum = 3;
        snprintf(c.balance.policy, sizeof c.balance.policy, "%s", policies[i]);
        if (strstr(policies[i], "capacity")) c.balance.capacity_factor = 1.0f;
        if (strstr(policies[i], "topk_schedule"))
            snprintf(c.balance.topk_stages, sizeof c.balance.topk_stages,
                     "[{layers: \"[2]*2+[1]*2\", until_tokens: 600}, {layers: \"[1]*4\"}]");
        ml_model m;
        ml_loader d;
        if (model_init(&m, &c, backend_cpu(), 2, 0, &err) || loader_open(&d, path, 2, c.model.seq_len, c.model.vocab, &err)) {
            CHECK(0, "%s: %s", policies[i], err.msg);
            continue;
        }
        model_init_weights(&m, 1, NULL);
        int ok = 1;
        float bias_before = 0;
        for (int step = 0; step < 2; step++) {
            model_begin_step(&m, (uint64_t)step * 3 * 256);
            model_zero_grad(&m);
            for (int micro = 0; micro < 3; micro++) {
                loader_next(&d);
                float loss = model_forward(&m, d.inputs, d.targets);
                model_backward(&m, 1.0f / 3);
                ok &= isfinite(loss) && isfinite(m.last_aux);
            }
            model_adamw(&m, 1e-3f, 1.0f, step + 1);
            for (int l = 0; l < m.L; l++) {
                int64_t load = 0, sel = 0;
                for (int e = 0; e < m.E; e++)
                    load += m.stats.tokens_per_expert[l * m.E + e], sel += m.stats.selected[l * m.E + e];
                int64_t want = m.stats.tokens * m.layer_k[l];
                CHECK(sel == want && load == want - m.stats.dropped[l],
                      "%s step %d layer %d: %lld choices, %lld loads, %lld dropped, tokens*k = %lld", policies[i], step, l,
                      (long long)sel, (long long)load, (long long)m.stats.dropped[l], (long long)want);
                if (!strcmp(policies[i], "capacity")) ok &= m.stats.dropped[l] >= 0;
                else ok &= m.stats.dropped[l] == 0;
            }
            if (!strcmp(policies[i], "forced_balance"))
                for (int l = 0; l < m.L; l++) {
                    int64_t mn = INT64_MAX, mx = 0;
                    for (int e = 0; e < m.E; e++) {
                        int64_t v = m.stats.tokens_per_expert[l * m.E + e];
                        mn = v < mn ? v : mn, mx = v > mx ? v : mx;
                    }
                    CHECK(mx - mn <= 3, "forced_balance: loads range %lld..%lld", (long long)mn, (long long)mx);
                }
            if (strstr(policies[i], "topk_schedule"))
                CHECK(m.layer_k[0] == (step == 0 ? 2 : 1), "topk_schedule: step %d layer 0 k=%d", step, m.layer_k[0]);
            if (!strcmp(policies[i], "loss_free")) {
                /* one update per global batch (3 micro-batches): every bias moved by exactly +-u or 0 */
                model_end_step(&m);
                if (step == 0) {
                    int one_step = 1;
                    for (int j = 0; j < m.L * m.E; j++) {
                        float b = m.router_bias[j];
                        one_step &= b == 0 || fabsf(fabsf(b) - c.balance.bias_rate) < 1e-9f;
                    }
                    CHECK(one_step, "loss_free: biases after one 3-micro-batch step are not in {-u, 0, u}");
                    bias_before = m.router_bias[0];
                } else {
                    CHECK(fabsf(m.router_bias[0] - bias_before) <= c.balance.bias_rate + 1e-9f, "second update");
                }
            } else {
                model_end_step(&m);
            }
        }
        CHECK(ok, "%s: non-finite loss or unexpected drops", policies[i]);
        if (!strcmp(policies[i], "capacity")) {
            int64_t drops = 0;
            for (int l = 0; l < m.L; l++) drops += m.stats.dropped[l];
            CHECK(drops > 0, "capacity factor 1.0 on a fresh router dropped nothing");
        }
        printf("policy %-32s ok (aux %.4g)\n", policies[i], m.last_aux);
        model_free(&m);
        loader_close(&d);
    }
}

/* topk_schedule and loss_free state survive checkpoint + resume: straight 10 steps == 4 + resume + 6, with the
 * stage boundary (5 steps of 1024 tokens) inside the resumed part. */
static int same_file(const char *a, const char *b) {
    FILE *x = fopen(a, "rb"), *y = fopen(b, "rb");
    int same = x && y;
    while (same) {
        int ca = fgetc(x), cb = fgetc(y);
        if (ca != cb) same = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (x) fclose(x);
    if (y) fclose(y);
    return same;
}

static void check_policy_resume(const char *data) {
    char tmp[] = "/tmp/moelab_balance_XXXXXX";
    if (!mkdtemp(tmp)) return;
    ml_config c;
    ml_err err = {0};
    config_preset(&c, "tiny", NULL);
    snprintf(c.data.dir, sizeof c.data.dir, "%s", data);
    c.train.steps = 10, c.train.eval_every = 0, c.train.eval_batches = 2;
    c.run.db[0] = 0;
    snprintf(c.balance.policy, sizeof c.balance.policy, "loss_free+topk_schedule");
    snprintf(c.balance.topk_stages, sizeof c.balance.topk_stages,
             "[{layers: \"[2]*2\", until_tokens: 5120}, {layers: \"[1]*2\"}]");
    ml_train_opts quiet = {.quiet = 1}, four = {.quiet = 1, .stop_after = 4};
    ml_train_result res;
    char a[200], b[200];
    snprintf(c.run.dir, sizeof c.run.dir, "%s/straight", tmp);
    CHECK(train_run(&c, &quiet, &res, &err) == 0, "straight: %s", err.msg);
    snprintf(c.run.dir, sizeof c.run.dir, "%s/resumed", tmp);
    CHECK(train_run(&c, &four, &res, &err) == 0 && res.steps == 4, "first part: %s", err.msg);
    snprintf(c.run.resume, sizeof c.run.resume, "%s/resumed/checkpoint.bin", tmp);
    CHECK(train_run(&c, &quiet, &res, &err) == 0 && res.steps == 10, "resumed part: %s", err.msg);
    snprintf(a, sizeof a, "%s/straight/checkpoint.bin", tmp);
    snprintf(b, sizeof b, "%s/resumed/checkpoint.bin", tmp);
    CHECK(same_file(a, b), "loss_free+topk_schedule: 10 straight steps differ from 4 + resume + 6");
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd)) printf("warning: could not remove %s\n", tmp);
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : "data/tokens/vocab8192";
    const char *losses[] = {"aux_loss", "seq_aux_loss", "global_aux_loss", "top1_loss", "z_loss"};
    for (size_t i = 0; i < sizeof losses / sizeof losses[0]; i++)
        for (int score = 0; score < 2; score++)
            for (int k = 1; k <= 2; k++) check_loss_gradient(losses[i], score, k, 100 + i * 7 + score * 3 + k);
    for (size_t i = 0; i < sizeof losses / sizeof losses[0]; i++)
        for (int k = 1; k <= 2; k++) check_device_form(losses[i], k, 5 + i * 2 + k);
    check_loss_free_router(SCORE_SOFTMAX, 300);
    check_loss_free_router(SCORE_SIGMOID, 300);
    check_schedule();
    check_capacity();
    check_capacity_form();
    check_metrics();
    check_policies_in_model(data);
    check_forms_in_model(data, "seq_aux_loss+z_loss+top1_loss");
    check_forms_in_model(data, "global_aux_loss+aux_loss");
    check_forms_in_model(data, "capacity+aux_loss");
    check_policy_resume(data);
    printf("balance: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
