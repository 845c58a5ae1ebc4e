/* capacity.c: expert capacity (GShard; Switch Transformer): an expert takes at most
 * C = ceil(factor * M * k / E) assignments per micro-batch; the rest are dropped and those tokens pass
 * through the residual (their expert output is zero). Which ones an over-full expert keeps: `probs` keeps
 * the highest router scores, `position` the earliest tokens. Dropless when factor is 0. */
#include <math.h>
#include <stdlib.h>

#include "policy.h"

static int validate(const ml_config *cfg, ml_err *err) {
    if (!(cfg->balance.capacity_factor >= 0))
        return ml_errf(err, ML_EINPUT, "balance.capacity_factor: %g must not be negative (0 = dropless)",
                       cfg->balance.capacity_factor);
    return ML_OK;
}

typedef struct {
    float score;
    int pos; /* m * k + j */
} pick;

static int by_score_desc(const void *a, const void *b) {
    const pick *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    return x->pos - y->pos; /* ties: earlier token first */
}

static int cap_limit(const ml_config *cfg, const ml_balance_layer *x, int *by_score) {
    const double factor = cfg->balance.capacity_factor;
    *by_score = cfg->balance.drop_policy != DROP_POSITION;
    return factor > 0 ? (int)ceil(factor * x->M * x->k / x->E) : -1;
}

static void cap(const ml_config *cfg, const ml_balance_layer *x, int32_t *route) {
    int by_score;
    const int C = cap_limit(cfg, x, &by_score);
    if (C < 0) return;
    const int M = x->M, k = x->k, E = x->E;
    int *count = calloc(E, sizeof(int));
    if (!by_score) {
        for (int i = 0; i < M * k; i++) {
            int e = route[i];
            if (e < 0) continue;
            if (count[e] < C) count[e]++;
            else route[i] = -1;
        }
    } else {
        /* per expert, keep its C highest-scoring assignments */
        pick *all = malloc(sizeof(pick) * (size_t)M * k);
        int *start = calloc(E + 1, sizeof(int)), *fill = malloc(sizeof(int) * E);
        for (int i = 0; i < M * k; i++)
            if (route[i] >= 0) start[route[i] + 1]++;
        for (int e = 0; e < E; e++) start[e + 1] += start[e], fill[e] = start[e];
        for (int i = 0; i < M * k; i++)
            if (route[i] >= 0)
                all[fill[route[i]]++] = (pick){x->scores[(size_t)(i / k) * E + route[i]], i};
        for (int e = 0; e < E; e++) {
            int n = start[e + 1] - start[e];
            if (n <= C) continue;
            qsort(all + start[e], n, sizeof(pick), by_score_desc);
            for (int r = C; r < n; r++) route[all[start[e] + r].pos] = -1;
        }
        free(all), free(start), free(fill);
    }
    free(count);
}

const ml_policy policy_capacity = {
    .name = "capacity",
    .summary = "capacity factor: drop assignments over ceil(factor*M*k/E) per expert (GShard / Switch)",
    .keys = (const char *const[]){"balance.capacity_factor", "balance.drop_policy", NULL},
    .validate = validate,
    .cap = cap,
    .cap_limit = cap_limit,
};
