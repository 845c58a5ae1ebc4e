/* metrics.h: imbalance metrics of one MoE layer's expert loads (token counts per expert). One
 * implementation, used by the progress line, the trace tools and the plots. Loads are doubles so sums over
 * many steps fit; an all-zero layer gives zeros (and every expert dead). */
#ifndef MOELAB_METRICS_H
#define MOELAB_METRICS_H

#include <stdint.h>

typedef struct {
    double total;          /* tokens routed (sum of loads) */
    double maxvio;         /* (max_i load_i - mean) / mean (arXiv 2408.15664) */
    double min_dev, max_dev; /* (min - mean) / mean and (max - mean) / mean: Sigma-MoE-Tiny Fig. 2a */
    double cv;             /* coefficient of variation: population std / mean */
    double entropy;        /* normalised entropy of the load distribution, in [0, 1] (1 = uniform) */
    double gini;           /* Gini coefficient of the loads, in [0, 1 - 1/E] */
    int dead;              /* experts with no tokens */
    double top20_share;    /* share of tokens on the most-loaded ceil(20%) experts */
    double bottom20_share; /* share on the least-loaded ceil(20%) experts */
} ml_load_metrics;

/* Metrics of loads[0..E). */
void metrics_compute(ml_load_metrics *out, const double *loads, int E);

/* Same, from integer counts. */
void metrics_compute_i64(ml_load_metrics *out, const int64_t *counts, int E);

/* Dropped fraction: dropped / (kept + dropped) assignments; 0 when there were none. */
double metrics_drop_fraction(double kept, double dropped);

/* Overload factor under expert parallelism: the most-loaded rank's tokens over the balanced share
 * (total / ranks). rank_of_expert[e] in [0, ranks). */
double metrics_overload_factor(const double *loads, int E, const int *rank_of_expert, int ranks);

#endif
