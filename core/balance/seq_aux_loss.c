/* seq_aux_loss.c: the sequence-level load-balancing loss: the aux loss computed over each sequence's T
 * tokens and averaged over the B sequences (DeepSeek-V2/V3's sequence-wise balance loss; Megatron-Core's
 * "seq_aux_loss"). */
#include <stdlib.h>
#include <string.h>

#include "policy.h"

static double loss(const ml_config *cfg, const ml_balance_layer *x) {
    double *f = malloc(sizeof(double) * x->E), total = 0;
    for (int b = 0; b < x->B; b++) {
        memset(f, 0, sizeof(double) * x->E);
        for (int m = b * x->T; m < (b + 1) * x->T; m++)
            for (int j = 0; j < x->k; j++) f[x->idx[(size_t)m * x->k + j]] += 1.0 / ((double)x->T * x->k);
        total += lbl_term(f, x->scores, x->dscores, b * x->T, (b + 1) * x->T, x->E, cfg->balance.aux_coef,
                          1.0 / x->B) / x->B;
    }
    free(f);
    return total;
}

/* the mean over sequences of coef E sum_i f_bi P_bi: g_bi = coef E f_bi / B, f_bi = choices in b / (T k) */
static void lbl(const ml_config *cfg, const ml_balance_layer *x, double *g) {
    for (size_t i = 0; i < (size_t)x->B * x->E; i++)
        g[i] += (double)cfg->balance.aux_coef * x->E * x->seq_selected[i] / ((double)x->T * x->k) / x->B;
}

const ml_policy policy_seq_aux_loss = {
    .name = "seq_aux_loss",
    .summary = "aux loss per sequence, averaged over the batch (DeepSeek-V2/V3 sequence-wise balance loss)",
    .keys = (const char *const[]){"balance.aux_coef", NULL},
    .validate = aux_coef_validate,
    .loss = loss,
    .lbl = lbl,
};
