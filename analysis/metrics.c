/* metrics.c: imbalance metrics over a vector of expert loads (see metrics.h for the definitions). */
#include "metrics.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void metrics_compute(ml_load_metrics *o, const double *loads, int E) {
    memset(o, 0, sizeof *o);
    if (E <= 0) return;
    double total = 0, mx = loads[0], mn = loads[0];
    for (int e = 0; e < E; e++) {
        total += loads[e];
        mx = loads[e] > mx ? loads[e] : mx;
        mn = loads[e] < mn ? loads[e] : mn;
        o->dead += loads[e] <= 0;
    }
    o->total = total;
    if (total <= 0) return;
    const double mean = total / E;
    o->maxvio = o->max_dev = (mx - mean) / mean;
    o->min_dev = (mn - mean) / mean;
    double var = 0, h = 0;
    for (int e = 0; e < E; e++) {
        var += (loads[e] - mean) * (loads[e] - mean);
        double p = loads[e] / total;
        if (p > 0) h -= p * log(p);
    }
    o->cv = sqrt(var / E) / mean;
    o->entropy = E > 1 ? h / log((double)E) : 1;
    double *sorted = malloc(sizeof(double) * E);
    memcpy(sorted, loads, sizeof(double) * E);
    qsort(sorted, E, sizeof(double), cmp_double);
    /* Gini from the sorted loads: sum_i (2i - E - 1) x_i / (E sum x), i = 1..E */
    double g = 0;
    for (int i = 0; i < E; i++) g += (2.0 * (i + 1) - E - 1) * sorted[i];
    o->gini = g / (E * total);
    int n20 = (int)ceil(0.2 * E);
    double top = 0, bottom = 0;
    for (int i = 0; i < n20; i++) bottom += sorted[i], top += sorted[E - 1 - i];
    o->top20_share = top / total;
    o->bottom20_share = bottom / total;
    free(sorted);
}

void metrics_compute_i64(ml_load_metrics *out, const int64_t *counts, int E) {
    double *loads = malloc(sizeof(double) * (E > 0 ? E : 1));
    for (int e = 0; e < E; e++) loads[e] = (double)counts[e];
    metrics_compute(out, loads, E);
    free(loads);
}

double metrics_drop_fraction(double kept, double dropped) {
    return kept + dropped > 0 ? dropped / (kept + dropped) : 0;
}

double metrics_overload_factor(const double *loads, int E, const int *rank_of_expert, int ranks) {
    if (ranks <= 0) return 0;
    double *per_rank = calloc(ranks, sizeof(double)), total = 0, mx = 0;
    for (int e = 0; e < E; e++) per_rank[rank_of_expert[e]] += loads[e], total += loads[e];
    for (int r = 0; r < ranks; r++) mx = per_rank[r] > mx ? per_rank[r] : mx;
    free(per_rank);
    return total > 0 ? mx / (total / ranks) : 0;
}
