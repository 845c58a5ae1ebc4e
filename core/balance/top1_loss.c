/* top1_loss.c: the load-balancing loss proposed for top-1 routing by Sigma-MoE-Tiny's first author (public
 * code, not merged; see ../shared/PAPER.md): P~ = softmax(logits / tau), f~_i = mean_t P~_ti (a smooth,
 * differentiable stand-in for the token fractions), s = mean over tokens of the summed top-k scores;
 * L = coef * E * sum_i f~_i^2 / s. Unlike aux_loss its minimum needs the fractions themselves uniform, not
 * just the mean probabilities. The gradient reaches the logits through f~ and the scores through s. */
#include <math.h>
#include <stdint.h>

#include "policy.h"

static int validate(const ml_config *cfg, ml_err *err) {
    if (!(cfg->balance.top1_coef >= 0))
        return ml_errf(err, ML_EINPUT, "balance.top1_coef: %g must not be negative", cfg->balance.top1_coef);
    if (!(cfg->balance.top1_tau > 0))
        return ml_errf(err, ML_EINPUT, "balance.top1_tau: %g must be positive", cfg->balance.top1_tau);
    return ML_OK;
}

/* P~ of token m into p (E values): softmax(logits_m / tau). */
static void tempered_softmax(const float *l, int E, double tau, double *p) {
    double mx = l[0], sum = 0;
    for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
    for (int e = 0; e < E; e++) sum += (p[e] = expf((float)((l[e] - mx) / tau))); /* float exp: 2x cheaper, ~1e-7 */
    for (int e = 0; e < E; e++) p[e] /= sum;
}

static double loss(const ml_config *cfg, const ml_balance_layer *x) {
    const int M = x->M, E = x->E, k = x->k;
    const double tau = cfg->balance.top1_tau, coef = cfg->balance.top1_coef;
    /* two passes over the tokens (f~ and s first, then the gradient) recompute P~ rather than keep an M x E
     * array: this runs per layer and micro-batch, and a large allocation there costs page faults */
    /* first pass in fixed chunks summed in a fixed order: parallel, and the same bits however threads run */
    enum { CHUNKS = 16 };
    double part_f[CHUNKS][E], part_s[CHUNKS], f[E], s = 0;
#pragma omp parallel for
    for (int c = 0; c < CHUNKS; c++) {
        double p[E];
        for (int e = 0; e < E; e++) part_f[c][e] = 0;
        part_s[c] = 0;
        for (int m = (int)((int64_t)M * c / CHUNKS); m < (int)((int64_t)M * (c + 1) / CHUNKS); m++) {
            tempered_softmax(x->logits + (size_t)m * E, E, tau, p);
            for (int e = 0; e < E; e++) part_f[c][e] += p[e] / M;
            for (int j = 0; j < k; j++) part_s[c] += x->scores[(size_t)m * E + x->idx[(size_t)m * k + j]] / M;
        }
    }
    for (int e = 0; e < E; e++) f[e] = 0;
    for (int c = 0; c < CHUNKS; c++) {
        for (int e = 0; e < E; e++) f[e] += part_f[c][e];
        s += part_s[c];
    }
    double sq = 0;
    for (int e = 0; e < E; e++) sq += f[e] * f[e];
    const double L = coef * E * sq / s;
    if (coef > 0) {
#pragma omp parallel for
        for (int m = 0; m < M; m++) {
            /* via f~: dL/df_i = 2 coef E f_i / s, f_i = mean_t softmax(l_t / tau)_i */
            double p[E];
            tempered_softmax(x->logits + (size_t)m * E, E, tau, p);
            double dot = 0;
            for (int e = 0; e < E; e++) dot += p[e] * 2 * coef * E * f[e] / s;
            for (int e = 0; e < E; e++)
                x->dlogits[(size_t)m * E + e] += (float)(p[e] * (2 * coef * E * f[e] / s - dot) / (tau * M));
            /* via s: dL/ds = -L / s, s = mean_t sum_j score(t, idx_tj) */
            for (int j = 0; j < k; j++) x->dscores[(size_t)m * E + x->idx[(size_t)m * k + j]] += (float)(-L / s / M);
        }
    }
    return L;
}

static double tau(const ml_config *cfg) { return cfg->balance.top1_tau; }

/* the device form: the same value from the backend's sums; the gradient's coefficients per token, dL/dlogits
 * = p (c - p.c) / tau with c_i = 2 coef E f_i / (s M), and dL/dscore = a = -L / (s M) on each chosen score */
static double tempered(const ml_config *cfg, const ml_balance_layer *x, double *c, double *a) {
    const int M = x->M, E = x->E;
    const double coef = cfg->balance.top1_coef, s = x->tempered_ssum / M;
    if (M == 0 || !(s > 0)) return *a = 0, 0;
    double sq = 0;
    for (int e = 0; e < E; e++) sq += (x->tempered_fsum[e] / M) * (x->tempered_fsum[e] / M);
    const double L = coef * E * sq / s;
    for (int e = 0; e < E; e++) c[e] = 2 * coef * E * (x->tempered_fsum[e] / M) / (s * M);
    *a = -L / (s * M);
    return L;
}

const ml_policy policy_top1_loss = {
    .name = "top1_loss",
    .summary = "coef*E*sum f~_i^2 / s with f~ = mean softmax(logits/tau), s = mean top-k score (Sigma-MoE-Tiny author)",
    .keys = (const char *const[]){"balance.top1_coef", "balance.top1_tau", NULL},
    .validate = validate,
    .loss = loss,
    .tau = tau,
    .tempered = tempered,
};
