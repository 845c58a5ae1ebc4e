/* policy.h: load-balancing policies as plug-ins. A policy is a named struct of optional callbacks that the
 * model and the train loop call at fixed points:
 *   choose_k    before a step: k per layer from the tokens seen so far (topk_schedule)
 *   assign      instead of top-k selection: which experts each token goes to (forced_balance)
 *   cap         after selection: drop assignments over an expert's capacity (capacity)
 *   loss        after routing: a loss term and its gradient on the router scores and logits (aux losses)
 *   lbl, z_coef, tau + tempered, cap_limit
 *               the same loss or cap in a form the backend computes where the scores live (see below)
 *   after_step  after the optimizer step, once per global batch: update the selection biases (loss_free)
 * Policies compose (balance.policy=aux_loss+z_loss+topk_schedule). Adding one is one file in core/balance/
 * plus its line in registry.c. Everything here runs on host memory. */
#ifndef MOELAB_POLICY_H
#define MOELAB_POLICY_H

#include <stdint.h>
#include <stdio.h>

#include "config.h"
#include "err.h"

/* Routing statistics of every MoE layer, summed over the micro-batches of one step (or one evaluation). */
typedef struct {
    int L, E;
    int64_t *tokens_per_expert; /* (L, E): assignments that reached the expert (after drops) */
    int64_t *selected;          /* (L, E): assignments chosen by the router (before drops) */
    double *gate_mean_sum;      /* (L, E): per micro-batch mean normalised router score, summed */
    double *policy_loss;        /* (L): the balancing terms' value, summed over micro-batches */
    int64_t *dropped;           /* (L): assignments dropped by capacity */
    int64_t tokens;             /* tokens seen (per layer) */
    int micro_batches;
} ml_route_stats;

int route_stats_alloc(ml_route_stats *s, int L, int E);
void route_stats_reset(ml_route_stats *s);
void route_stats_free(ml_route_stats *s);

/* One MoE layer in one micro-batch, as a policy sees it (host memory). */
typedef struct {
    int layer, M, E, k, B, T;     /* M = B * T tokens */
    uint64_t stream;              /* distinct per (seed, step, micro-batch, layer): for policies that draw */
    const float *logits;          /* (M, E) */
    const float *scores;          /* (M, E) softmax or sigmoid scores */
    const int32_t *idx;           /* (M, k) chosen experts */
    const int32_t *selected;      /* (E) this micro-batch's choices per expert (before drops) */
    const int64_t *running_selected; /* (E) choices per expert over the global batch so far, this one included */
    int64_t running_tokens;       /* tokens of the global batch so far, this micro-batch included */
    float *dscores, *dlogits;     /* (M, E) gradient accumulators: a loss adds dL/dscores and dL/dlogits */
    const double *score_mean;     /* (E) mean over the micro-batch of s_te / sum_e' s_te' (from the backend) */
    const int32_t *seq_selected;  /* (B, E) choices per expert in each sequence (before drops) */
    const double *seq_score_mean; /* (B, E) score_mean over each sequence */
    const double *tempered_fsum;  /* (E) sum over tokens of softmax(logits_t / tau) (for tempered) */
    double tempered_ssum;         /* sum over tokens of the chosen scores (for tempered) */
} ml_balance_layer;

typedef struct ml_policy {
    const char *name;
    const char *summary;            /* one line, with its source */
    const char *const *keys;        /* the config keys it reads, NULL-terminated */
    int (*validate)(const ml_config *cfg, ml_err *err);
    int (*max_k)(const ml_config *cfg);   /* the largest k it may choose (buffers are sized for it) */
    void (*choose_k)(const ml_config *cfg, uint64_t tokens_seen, int *layer_k);
    void (*assign)(const ml_config *cfg, const ml_balance_layer *x, int32_t *idx);
    void (*cap)(const ml_config *cfg, const ml_balance_layer *x, int32_t *route);
    double (*loss)(const ml_config *cfg, const ml_balance_layer *x);
    /* Optional device forms of loss: with them the model reads only statistics the backend reduced (backend.h
     * route_stats, zloss_*, tempered_*) and never copies a layer's scores or logits to the host.
     *   lbl       the loss is sum_b sum_e g_be P_be with P_be = x->seq_score_mean: adds its g (B, E)
     *   z_coef    the loss is coef * mean_t logsumexp(logits_t)^2: returns coef
     *   tau, tempered
     *             the loss is a function of f = x->tempered_fsum / M (softmax of logits / tau) and s =
     *             x->tempered_ssum / M (chosen scores): tempered returns it and the gradient's coefficients
     *             for tempered_backward, c (E) and a, per token (the 1/M folded in) */
    void (*lbl)(const ml_config *cfg, const ml_balance_layer *x, double *g);
    double (*z_coef)(const ml_config *cfg);
    double (*tau)(const ml_config *cfg);
    double (*tempered)(const ml_config *cfg, const ml_balance_layer *x, double *c, double *a);
    /* optional device form of cap: the capacity (choices per expert; -1 = none) and whether an over-full
     * expert keeps its highest-scoring choices (else its earliest); the backend's capacity_route drops */
    int (*cap_limit)(const ml_config *cfg, const ml_balance_layer *x, int *by_score);
    void (*after_step)(const ml_config *cfg, const ml_route_stats *stats, const int *layer_k, float *bias);
} ml_policy;

/* The active policies of a config, in the order balance.policy names them. */
#define ML_MAX_POLICIES 8
typedef struct {
    const ml_policy *p[ML_MAX_POLICIES];
    int n;
    int has_loss, has_assign, has_cap, has_after_step;
    int has_host_loss; /* a loss without a device form: every loss runs on host copies of scores and logits */
    int has_host_cap;  /* a cap without a device form: caps run on host copies of the scores and choices */
    int has_lbl;       /* device forms in use (when !has_host_loss): lbl, the summed z coefficient, tempered */
    double z_coef;
    const ml_policy *tempered;
} ml_balance;

/* Parses balance.policy ("none", "aux_loss+z_loss", ...) and validates each policy's keys. */
int balance_init(ml_balance *b, const ml_config *cfg, ml_err *err);

/* balance_init without keeping the result: config_validate's check of the balance.* keys. */
int balance_validate(const ml_config *cfg, ml_err *err);

/* The largest k any layer may use under cfg (model.top_k / layer_top_k and every policy's choice). */
int balance_max_k(const ml_config *cfg);

/* k per layer for a step that starts after tokens_seen tokens; dense layers stay 0. */
void balance_choose_k(const ml_balance *b, const ml_config *cfg, uint64_t tokens_seen, int *layer_k);

void balance_assign(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, int32_t *idx);
void balance_cap(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, int32_t *route);
/* The device form (when !has_host_cap): the smallest capacity of the cap policies (-1 = none) and its policy's
 * by_score. */
int balance_cap_limit(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, int *by_score);
/* Sum of the loss terms; their gradients accumulate into x->dscores and x->dlogits. */
double balance_loss(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x);
/* The device forms (when !has_host_loss): g (B, E) = the sum of the lbl forms' g, and the summed value of all
 * device-form losses; for tempered, c (E) and *a as its callback gives them. zsum = backend zloss_forward's. */
double balance_device_loss(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, double zsum,
                           double *g, double *c, double *a);
void balance_after_step(const ml_balance *b, const ml_config *cfg, const ml_route_stats *stats,
                        const int *layer_k, float *bias);

/* The registry: every policy, NULL-terminated; and lookup by name. */
extern const ml_policy *const ml_policies[];
const ml_policy *policy_find(const char *name);

/* Prints every policy with its summary and keys (moelab train --help-policies). */
void balance_print_help(FILE *f);

/* Shared by the aux-loss family: L = coef * E * sum_i f_i * P_i over the token rows [m0, m1) of scores,
 * P_i = mean over those rows of s_ti / sum_e s_te; accumulates weight * dL/ds into dscores (f is constant).
 * Returns L. (Switch Transformer, Fedus et al. 2022, eq. 4; GShard.) */
double lbl_term(const double *f, const float *scores, float *dscores, int m0, int m1, int E, double coef,
                double weight);

/* The lbl form of lbl_term over the whole micro-batch (P_i is the mean of the B sequences' means): adds
 * coef E f_i / B to g (B, E) for every sequence. */
void lbl_add_batch(const ml_balance_layer *x, const double *f, double coef, double *g);

/* The aux-loss family's check of balance.aux_coef. */
int aux_coef_validate(const ml_config *cfg, ml_err *err);

#endif
