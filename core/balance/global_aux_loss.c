/* global_aux_loss.c: the global-batch load-balancing loss (Qiu et al., arXiv 2501.11873): f_i counts the
 * choices of the whole global batch instead of one micro-batch, so experts may specialise by domain while
 * the batch as a whole stays balanced. Under gradient accumulation each micro-batch uses the counts of the
 * global batch so far (this one included), as Megatron-Core's global_aux_loss tracker does; once the
 * distributed issue lands the counts are also summed over data-parallel ranks (the running_selected
 * seam). P stays local to the micro-batch. */
#include "policy.h"

/* f_i = choices of expert i / (tokens k) over the global batch so far */
static void fractions(const ml_balance_layer *x, double *f) {
    for (int e = 0; e < x->E; e++) f[e] = (double)x->running_selected[e] / ((double)x->running_tokens * x->k);
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

const ml_policy policy_global_aux_loss = {
    .name = "global_aux_loss",
    .summary = "aux loss with f counted over the global batch (arXiv 2501.11873)",
    .keys = (const char *const[]){"balance.aux_coef", NULL},
    .validate = aux_coef_validate,
    .loss = loss,
    .lbl = lbl,
};
