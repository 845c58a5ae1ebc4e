/* model.h: the decoder-only MoE transformer, written once against the backend op table (backend.h).
 *   embed -> per block [RMSNorm -> GQA attention with RoPE (opt. QK-norm) -> residual;
 *                       RMSNorm -> MoE FFN (router, top-k SwiGLU experts, opt. shared experts) or a dense
 *                       SwiGLU FFN in the first model.dense_layers blocks -> residual]
 *   -> final RMSNorm -> LM head (tied or not) -> cross-entropy.
 * All parameters live in one allocation described by a table of named tensors; gradients and AdamW moments
 * mirror it. Activations are allocated once for a micro-batch of B sequences; nothing is allocated per step. */
#ifndef MOELAB_MODEL_H
#define MOELAB_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "balance/policy.h"
#include "config.h"
#include "err.h"

#define ML_MAX_TENSORS (16 * ML_MAX_LAYERS + 8)

typedef struct {
    char name[48];     /* e.g. "layers.3.experts.w13" */
    size_t offset;     /* in floats, into the parameter arena */
    size_t numel;
    int ndim, shape[3];
    int decay;         /* AdamW weight decay applies (not to norms) */
} ml_tensor;

/* Pointers into one arena (parameters or their gradients) for one block. NULL where the block has no such
 * tensor (q_norm without model.qk_norm, router in a dense block, ...). */
typedef struct {
    float *attn_norm, *wq, *wk, *wv, *wo, *q_norm, *k_norm, *ffn_norm;
    float *dense_w13, *dense_w2;              /* dense FFN: (2Fd, C), (C, Fd) */
    float *router;                            /* (E, C) */
    float *expert_w13, *expert_w2;            /* (E, 2F, C): gate rows then up rows; (E, C, F) */
    float *shared_w13, *shared_w2;            /* shared experts fused: (2 S Fs, C), (C, S Fs) */
} ml_block_tensors;

typedef struct {
    float *wte, *final_norm, *lm_head;        /* lm_head == wte when tied */
    ml_block_tensors block[ML_MAX_LAYERS];
} ml_tensors;

/* Saved activations of one block for the backward. */
typedef struct {
    float *res_in, *ln1, *rstd1, *q_raw, *k_raw, *v, *q_normed, *k_normed, *q_rstd, *k_rstd, *q, *k, *att, *atty;
    float *res_mid, *ln2, *rstd2;
    float *h13, *act;                                   /* dense FFN */
    float *logits, *probs, *gate;                       /* router (M,E), (M,E), (M,kmax) */
    int32_t *idx, *route, *counts, *offsets, *slot;     /* (M,kmax) chosen, (M,kmax) after drops, (E), (E+1), (M*kmax) */
    float *xe, *eh13, *eact, *ye;                       /* expert buffers, rows sorted by expert */
    float *sh13, *sact;                                 /* shared experts */
} ml_block_acts;

typedef struct ml_model {
    ml_config cfg;
    const ml_backend *be;
    int B, T, C, L, H, KV, hd, V, E, F, Fd, Fs; /* Fs = shared_experts * shared_ffn */
    int layer_k[ML_MAX_LAYERS];                 /* active k per block (0 = dense); policies may change it */
    int kmax;                                   /* buffers are sized for this k */

    ml_tensor tensors[ML_MAX_TENSORS];
    int ntensors;
    size_t nparams;
    float *params, *grads, *adam_m, *adam_v;    /* backend memory, nparams each */
    ml_tensors p, g;                            /* views into params and grads */
    float *router_bias;                         /* (L, E) selection bias (loss-free balancing); not trained */

    ml_block_acts acts[ML_MAX_LAYERS];
    float *res_final, *lnf, *rstdf, *logits, *losses, *rope_cos, *rope_sin;
    int32_t *tokens, *targets;                  /* (B*T) on the backend */
    /* backward scratch, reused by every block */
    float *d_res, *d_ln, *d_a, *d_b, *d_q, *d_k, *d_v, *d_qn, *d_kn, *d_logits;
    float *d_xe, *d_eh13, *d_eact, *d_ye, *d_gate, *d_probs, *d_rlogits, *d_h13, *d_act;
    /* host side of routing: copies of one layer's logits, scores and choices for the policies, and each
     * layer's policy gradients (kept from the forward for the backward) */
    float *h_logits, *h_scores, *h_tmp;        /* (M, E) */
    int32_t *h_idx, *h_route, *h_selected;     /* (M, kmax), (M, kmax), (E) */
    float *h_bias;                             /* (L, E) host copy of the biases for the policies */
    /* one layer's reduced statistics on the backend: per-sequence score sums (B, E), the z-loss's and
     * tempered loss's sums (1, 1, E) as doubles, then per-sequence choices (B, E) as ints; h_rstats holds a
     * host copy per layer (pinned where the backend has it), followed by the layer's loads (E ints). When no
     * policy needs them at once they are copied asynchronously and recorded at the end of the forward
     * (rstats_pending). */
    void *d_rstats, *h_rstats;
    size_t rstats_bytes;                       /* d_rstats's size; a layer's host slot adds E ints */
    unsigned char rstats_pending[ML_MAX_LAYERS];
    int moe_rows[ML_MAX_LAYERS];               /* each MoE layer's routed rows in the latest forward */
    double *h_score_mean, *h_seq_score_mean;   /* (E), (B, E): score sums over M, and per sequence over T */
    double *h_g;                               /* (B, E) lbl weights, then (E) tempered coefficients c */
    float *d_lbl, *h_lbl;                      /* (L, B E + E): each layer's g and c, for the backward */
    double *h_tempered_a;                      /* (L) each layer's tempered coefficient a, for the backward */
    float *h_dscores, *h_dlogits;              /* (L, M, E), only when a policy has a loss */

    ml_balance balance;                         /* the active policies (balance.policy) */
    ml_route_stats stats;                       /* this step's routing statistics (training micro-batches) */
    ml_route_stats eval_stats;                  /* the latest evaluation's (MaxVio_global) */
    int eval_mode;                              /* forward records into eval_stats and keeps no gradients */
    uint64_t tokens_seen;                       /* at the start of the current step (topk_schedule, streams) */
    float last_loss, last_aux;                  /* of the latest forward: mean CE, summed balancing loss */
    double routing_seconds;                     /* wall time in routing: router GEMMs and op, dispatch, policies,
                                                 * statistics (forward and backward); for moelab bench */
    int time_routing;                           /* wait for the backend at both ends of the routing sections,
                                                 * so routing_seconds is device time (four syncs per MoE layer) */
} ml_model;

/* Builds the tensor table and allocates parameters, gradients, optimizer state and activations for
 * micro-batches of B sequences of model.seq_len tokens; kmax >= every k a policy may pick (0 = from config).
 * Fails with ML_EINPUT on an invalid config, ML_ERUN when memory runs out. */
int model_init(ml_model *m, const ml_config *cfg, const ml_backend *be, int B, int kmax, ml_err *err);
void model_free(ml_model *m);

/* GPT-2-style init from seed: normal(0, init_std) weights, output projections scaled by 1/sqrt(2L), norms 1.
 * The same weights for any thread count and backend. Fails with ML_ERUN when host memory runs out. */
int model_init_weights(ml_model *m, uint64_t seed, ml_err *err);

/* Runs the forward pass on tokens (B*T host ints). With targets (host) it returns the mean cross-entropy and
 * records routing statistics and the balancing losses (into eval_stats in eval_mode); without, it only
 * computes logits and returns 0. */
float model_forward(ml_model *m, const int32_t *tokens, const int32_t *targets);

/* Backward of the latest forward, scaled by loss_scale (1/accum): accumulates into m->grads. */
void model_backward(ml_model *m, float loss_scale);

void model_zero_grad(ml_model *m);

/* Starts an optimizer step after tokens_seen training tokens: the policies choose each layer's k, and the
 * step's routing statistics are reset. */
void model_begin_step(ml_model *m, uint64_t tokens_seen);

/* Ends an optimizer step: the policies update the selection biases from the step's loads (loss_free). */
void model_end_step(ml_model *m);

/* Global gradient L2 norm. */
double model_grad_norm(ml_model *m);

/* One AdamW step (t is 1-based) with gradients multiplied by grad_scale; norms get no weight decay. */
void model_adamw(ml_model *m, float lr, float grad_scale, int t);

/* Looks a tensor up by name; NULL if absent. */
const ml_tensor *model_tensor(const ml_model *m, const char *name);

/* Parameter counts: total, and active per token (routed experts counted k at a time). */
size_t model_param_count(const ml_config *cfg);
double model_active_params(const ml_config *cfg);

#endif
