/* z_loss.c: the router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): coef * mean_t logsumexp(logits_t)^2. It
 * keeps router logits small for numerical stability; it does not balance by itself. */
#include <math.h>

#include "policy.h"

static int validate(const ml_config *cfg, ml_err *err) {
    if (!(cfg->balance.z_coef >= 0))
        return ml_errf(err, ML_EINPUT, "balance.z_coef: %g must not be negative", cfg->balance.z_coef);
    return ML_OK;
}

static double loss(const ml_config *cfg, const ml_balance_layer *x) {
    const int M = x->M, E = x->E;
    const double coef = cfg->balance.z_coef;
    double total = 0;
    for (int m = 0; m < M; m++) {
        const float *l = x->logits + (size_t)m * E;
        double mx = l[0], sum = 0;
        for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        for (int e = 0; e < E; e++) sum += exp(l[e] - mx);
        double lse = mx + log(sum);
        total += lse * lse;
        /* d/dl (lse^2) = 2 lse softmax(l) */
        float *d = x->dlogits + (size_t)m * E;
        for (int e = 0; e < E; e++) d[e] += (float)(2 * coef * lse * exp(l[e] - lse) / M);
    }
    return coef * total / M;
}

static double z_coef(const ml_config *cfg) { return cfg->balance.z_coef; }

const ml_policy policy_z_loss = {
    .name = "z_loss",
    .summary = "router z-loss coef*mean logsumexp(logits)^2 (ST-MoE)",
    .keys = (const char *const[]){"balance.z_coef", NULL},
    .validate = validate,
    .loss = loss,
    .z_coef = z_coef,
};
