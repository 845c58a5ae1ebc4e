/* aux_loss.c: the micro-batch auxiliary load-balancing loss (Switch/GShard form, as Megatron-Core defines
 * it), on host memory. Its gradient reaches the router through the scores only; the token fractions f are
 * constants. */
#include <stdlib.h>

#include "balance.h"

double aux_loss_micro(float *dscores, double *gate_mean, const float *scores, const int32_t *counts, int M, int E,
                      int k, float coef, float grad_scale) {
    double P[E], f[E];
    for (int e = 0; e < E; e++) P[e] = 0, f[e] = (double)counts[e] / ((double)M * k);
    double inv_sum[M > 0 ? M : 1];
    for (int m = 0; m < M; m++) {
        const float *s = scores + (size_t)m * E;
        double sum = 0;
        for (int e = 0; e < E; e++) sum += s[e];
        inv_sum[m] = 1.0 / sum;
        for (int e = 0; e < E; e++) P[e] += s[e] * inv_sum[m];
    }
    double loss = 0;
    for (int e = 0; e < E; e++) {
        P[e] /= M;
        loss += f[e] * P[e];
        if (gate_mean) gate_mean[e] = P[e];
    }
    loss *= (double)coef * E;
    if (dscores && coef > 0) {
        /* dL/ds_te = c/M * (g_e - sum_i g_i s_ti / S_t) / S_t with g = coef E f, S_t = sum_e s_te */
        for (int m = 0; m < M; m++) {
            const float *s = scores + (size_t)m * E;
            float *d = dscores + (size_t)m * E;
            double dot = 0;
            for (int e = 0; e < E; e++) dot += f[e] * s[e];
            dot *= inv_sum[m];
            double c = (double)grad_scale * coef * E / M * inv_sum[m];
            for (int e = 0; e < E; e++) d[e] += (float)(c * (f[e] - dot));
        }
    }
    return loss;
}
