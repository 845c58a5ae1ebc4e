/* balance.h: the seam where load-balancing policies act on the router. For now it holds the micro-batch
 * auxiliary loss; the policy plug-ins (issue "Pluggable load-balancing policies") grow from here: choose k
 * per layer, add a loss gradient on the router scores, update selection biases, cap capacity. */
#ifndef MOELAB_BALANCE_H
#define MOELAB_BALANCE_H

#include <stdint.h>

/* Micro-batch auxiliary load-balancing loss (Switch Transformer, Fedus et al. 2022, eq. 4; GShard):
 *   L = coef * E * sum_i f_i * P_i,  f_i = counts_i / (M k),  P_i = mean_t s_ti / sum_e s_te.
 * scores (M,E) are the router scores s (softmax or sigmoid), counts (E) the tokens per expert. Returns L and,
 * when dscores is non-NULL, accumulates grad_scale * dL/ds into it (f carries no gradient).
 * gate_mean (E), if non-NULL, receives P. */
double aux_loss_micro(float *dscores, double *gate_mean, const float *scores, const int32_t *counts, int M, int E,
                      int k, float coef, float grad_scale);

#endif
