/* route_ops_cpu.c: routing statistics and the balancing losses' device forms on the CPU. Sums run in double
 * over fixed chunks added in a fixed order, so results do not depend on the thread count. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "route_ops_cpu.h"

enum { CHUNKS = 16 }; /* fixed, so the chunk sums (and their bits) do not depend on the threads */
#define CHUNK_LO(c, M) ((int)((int64_t)(M) * (c) / CHUNKS))

void cpu_route_stats(double *psum, int32_t *selected, const float *probs, const int32_t *idx, int M, int k, int E,
                     int seg) {
    const int nseg = M / seg;
    memset(psum, 0, sizeof(double) * nseg * E);
    memset(selected, 0, sizeof(int32_t) * nseg * E);
    for (int t = 0; t < M; t++) {
        const float *s = probs + (size_t)t * E;
        double *ps = psum + (size_t)(t / seg) * E, sum = 0;
        for (int e = 0; e < E; e++) sum += s[e];
        for (int e = 0; e < E; e++) ps[e] += s[e] / sum;
        for (int j = 0; j < k; j++) {
            const int32_t e = idx[(size_t)t * k + j];
            if (e >= 0) selected[(size_t)(t / seg) * E + e]++;
        }
    }
}

void cpu_lbl_backward(float *dprobs, const float *probs, const float *g, float scale, int M, int E, int seg) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < M; t++) {
        const float *s = probs + (size_t)t * E, *gb = g + (size_t)(t / seg) * E;
        float *d = dprobs + (size_t)t * E;
        double sum = 0, dot = 0;
        for (int e = 0; e < E; e++) sum += s[e], dot += (double)gb[e] * s[e];
        const double inv = 1.0 / sum, c = scale * inv;
        dot *= inv;
        for (int e = 0; e < E; e++) d[e] += (float)(c * (gb[e] - dot));
    }
}

/* logsumexp of one row of logits / tau */
static double row_lse(const float *l, int E, double inv_tau) {
    double mx = l[0], sum = 0;
    for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
    for (int e = 0; e < E; e++) sum += exp((l[e] - mx) * inv_tau);
    return mx * inv_tau + log(sum);
}

void cpu_zloss_forward(double *zsum, const float *logits, int M, int E) {
    double part[CHUNKS];
#pragma omp parallel for
    for (int c = 0; c < CHUNKS; c++) {
        double acc = 0;
        for (int t = CHUNK_LO(c, M); t < CHUNK_LO(c + 1, M); t++) {
            const double lse = row_lse(logits + (size_t)t * E, E, 1);
            acc += lse * lse;
        }
        part[c] = acc;
    }
    double total = 0;
    for (int c = 0; c < CHUNKS; c++) total += part[c];
    *zsum = total;
}

void cpu_zloss_backward(float *dlogits, const float *logits, float scale, int M, int E) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < M; t++) {
        const float *l = logits + (size_t)t * E;
        const double lse = row_lse(l, E, 1);
        float *d = dlogits + (size_t)t * E;
        for (int e = 0; e < E; e++) d[e] += (float)(scale * lse * exp(l[e] - lse));
    }
}

void cpu_tempered_forward(double *fsum, double *ssum, const float *logits, const float *probs, const int32_t *idx,
                          float tau, int M, int k, int E) {
    double part_f[CHUNKS][E], part_s[CHUNKS];
    const double inv_tau = 1.0 / tau;
#pragma omp parallel for
    for (int c = 0; c < CHUNKS; c++) {
        for (int e = 0; e < E; e++) part_f[c][e] = 0;
        part_s[c] = 0;
        for (int t = CHUNK_LO(c, M); t < CHUNK_LO(c + 1, M); t++) {
            const float *l = logits + (size_t)t * E;
            const double lse = row_lse(l, E, inv_tau);
            for (int e = 0; e < E; e++) part_f[c][e] += exp(l[e] * inv_tau - lse);
            for (int j = 0; j < k; j++) {
                const int32_t e = idx[(size_t)t * k + j];
                if (e >= 0) part_s[c] += probs[(size_t)t * E + e];
            }
        }
    }
    for (int e = 0; e < E; e++) fsum[e] = 0;
    *ssum = 0;
    for (int c = 0; c < CHUNKS; c++) {
        for (int e = 0; e < E; e++) fsum[e] += part_f[c][e];
        *ssum += part_s[c];
    }
}

void cpu_tempered_backward(float *dlogits, float *dprobs, const float *logits, const int32_t *idx, const float *c,
                           float cscale, float a, float tau, int M, int k, int E) {
    const double inv_tau = 1.0 / tau;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < M; t++) {
        const float *l = logits + (size_t)t * E;
        double p[E], dot = 0;
        const double lse = row_lse(l, E, inv_tau);
        for (int e = 0; e < E; e++) p[e] = exp(l[e] * inv_tau - lse), dot += p[e] * c[e];
        float *d = dlogits + (size_t)t * E;
        for (int e = 0; e < E; e++) d[e] += (float)(cscale * p[e] * (c[e] - dot) * inv_tau);
        for (int j = 0; j < k; j++) {
            const int32_t e = idx[(size_t)t * k + j];
            if (e >= 0) dprobs[(size_t)t * E + e] += a;
        }
    }
}

/* a choice of one expert: its score and its position m k + j (the tie-break: earlier first) */
typedef struct {
    float score;
    int pos;
} pick;

static int by_score_desc(const void *a, const void *b) {
    const pick *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    return x->pos - y->pos;
}

void cpu_capacity_route(int32_t *route, const int32_t *idx, const float *probs, const int32_t *offsets,
                        const int32_t *slot, int cap, int by_score, int M, int k, int E) {
    const int n = M * k;
    for (int i = 0; i < n; i++) /* by position: the slot's rank among its expert's choices (the sort is stable) */
        route[i] = idx[i] >= 0 && slot[i] - offsets[idx[i]] < cap ? idx[i] : -1;
    if (!by_score) return;
    /* by score: each over-full expert's choices in slot order, sorted by score; its first cap are kept */
    pick *all = malloc(sizeof(pick) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++)
        if (idx[i] >= 0) all[slot[i]] = (pick){probs[(size_t)(i / k) * E + idx[i]], i};
    for (int e = 0; e < E; e++) {
        const int lo = offsets[e], cnt = offsets[e + 1] - offsets[e];
        if (cnt <= cap) {
            for (int r = 0; r < cnt; r++) route[all[lo + r].pos] = e;
            continue;
        }
        qsort(all + lo, cnt, sizeof(pick), by_score_desc);
        for (int r = 0; r < cnt; r++) route[all[lo + r].pos] = r < cap ? e : -1;
    }
    free(all);
}
