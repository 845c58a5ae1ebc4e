/* aux_loss.c: the micro-batch auxiliary load-balancing loss, L = coef * E * sum_i f_i * P_i with
 * f_i = (tokens choosing expert i) / (M k) over the micro-batch and P_i the mean normalised router score
 * (Switch Transformer, Fedus et al. 2022, eq. 4; GShard; Megatron-Core's "aux_loss"). Also lbl_term, the
 * formula shared with seq_aux_loss and global_aux_loss. */
#include <stdlib.h>

#include "policy.h"

double lbl_term(const double *f, const float *scores, float *dscores, int m0, int m1, int E, double coef,
                double weight) {
    const int M = m1 - m0;
    if (M <= 0) return 0;
    double P[E], *inv = malloc(sizeof(double) * M); /* M doubles: small next to the M x E scores */
    for (int e = 0; e < E; e++) P[e] = 0;
    for (int m = m0; m < m1; m++) {
        const float *s = scores + (size_t)m * E;
        double sum = 0;
        for (int e = 0; e < E; e++) sum += s[e];
        inv[m - m0] = 1.0 / sum;
        for (int e = 0; e < E; e++) P[e] += s[e] * inv[m - m0];
    }
    double loss = 0;
    for (int e = 0; e < E; e++) loss += f[e] * P[e] / M;
    loss *= coef * E;
    if (dscores && coef > 0) {
        /* P_i = mean_t s_ti / S_t:  dL/ds_te = w coef E / M * (f_e - sum_i f_i s_ti / S_t) / S_t */
        for (int m = m0; m < m1; m++) {
            const float *s = scores + (size_t)m * E;
            float *d = dscores + (size_t)m * E;
            double dot = 0;
            for (int e = 0; e < E; e++) dot += f[e] * s[e];
            dot *= inv[m - m0];
            double c = weight * coef * E / M * inv[m - m0];
            for (int e = 0; e < E; e++) d[e] += (float)(c * (f[e] - dot));
        }
    }
    free(inv);
    return loss;
}

void lbl_add_batch(const ml_balance_layer *x, const double *f, double coef, double *g) {
    for (int b = 0; b < x->B; b++)
        for (int e = 0; e < x->E; e++) g[(size_t)b * x->E + e] += coef * x->E * f[e] / x->B;
}

int aux_coef_validate(const ml_config *cfg, ml_err *err) {
    if (!(cfg->balance.aux_coef >= 0))
        return ml_errf(err, ML_EINPUT, "balance.aux_coef: %g must not be negative", cfg->balance.aux_coef);
    return ML_OK;
}

/* f_i = choices of expert i / (M k) over the micro-batch */
static void fractions(const ml_balance_layer *x, double *f) {
    for (int e = 0; e < x->E; e++) f[e] = (double)x->selected[e] / ((double)x->M * x->k);
}

static void lbl(const ml_config *cfg, const ml_balance_layer *x, double *g) {
    double f[x->E];
    fractions(x, f);
    lbl_add_batch(x, f, cfg->balance.aux_coef, g);
}

static double loss(const ml_config *cfg, const ml_balance_layer *x) {
    double f[x->E];
    fractions(x, f);
    return lbl_term(f, x->scores, x->dscores, 0, x->M, x->E, cfg->balance.aux_coef, 1.0);
}

const ml_policy policy_aux_loss = {
    .name = "aux_loss",
    .summary = "micro-batch load-balancing loss coef*E*sum f_i P_i (Switch Transformer / GShard)",
    .keys = (const char *const[]){"balance.aux_coef", NULL},
    .validate = aux_coef_validate,
    .loss = loss,
    .lbl = lbl,
};
