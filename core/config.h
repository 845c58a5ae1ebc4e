/* config.h: the resolved configuration of a run. Every field has one dotted key (model.experts,
 * train.lr, ...) that is the same on the command line (key=value), in experiment files, in the run
 * database's params and in trace attributes. Presets fill the struct; overrides then change single keys;
 * config_validate rejects impossible combinations before any work starts. */
#ifndef MOELAB_CONFIG_H
#define MOELAB_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#include "err.h"

#define ML_MAX_LAYERS 256

enum ml_score { SCORE_SOFTMAX = 0, SCORE_SIGMOID = 1 };
enum ml_softmax_order { SOFTMAX_BEFORE_TOPK = 0, SOFTMAX_AFTER_TOPK = 1 };
enum ml_bias_rule { BIAS_SIGN = 0, BIAS_PROPORTIONAL = 1 };
enum ml_drop_policy { DROP_PROBS = 0, DROP_POSITION = 1 };
enum ml_forced { FORCED_ROUND_ROBIN = 0, FORCED_RANDOM = 1 };

typedef struct {
    char preset[64];
    uint64_t seed;

    struct {
        int vocab, dim, layers, heads, kv_heads, seq_len;
        int experts, expert_ffn, top_k;
        char layer_top_k[512]; /* optional per-layer k list expression, e.g. "[2]*2+[1]*6"; "" = top_k everywhere */
        int shared_experts, shared_ffn;
        int dense_layers, dense_ffn;
        int score;         /* enum ml_score */
        int softmax_order; /* enum ml_softmax_order */
        int norm_topk;     /* renormalise the selected gates to sum to 1 */
        float route_scale;
        int qk_norm, tie_embeddings;
        float rope_theta, norm_eps, init_std;
    } model;

    struct {
        char policy[256];        /* '+'-separated policy names, e.g. "aux_loss+z_loss" */
        float aux_coef;          /* aux_loss, seq_aux_loss, global_aux_loss */
        float z_coef;            /* z_loss */
        float top1_coef, top1_tau; /* top1_loss */
        float bias_rate;         /* loss_free: u */
        int bias_rule;           /* enum ml_bias_rule */
        char topk_stages[1024];  /* topk_schedule: [{layers: "[2]*2+[1]*6", until_tokens: 20e6}, {layers: "[1]*8"}] */
        float capacity_factor;   /* capacity: 0 = dropless */
        int drop_policy;         /* enum ml_drop_policy */
        int forced;              /* enum ml_forced */
    } balance;

    struct {
        int batch, steps, accum, warmup;
        float lr, min_lr_ratio, weight_decay, beta1, beta2, eps, grad_clip;
        int eval_every, eval_batches, ckpt_every, log_every;
    } train;

    struct {
        char dir[512]; /* holds train.bin and val.bin */
    } data;

    struct {
        char dir[512]; /* run folder: config.yaml, checkpoints, log */
        char resume[512]; /* checkpoint path to resume from, "" = fresh */
        char id[128];     /* run id in the database; "" = the run folder's name */
        char name[128];   /* display name; "" = the id */
        char experiment[128];
        char db[512];     /* run database path; "" = no database */
    } run;

    struct {
        int every;        /* trace every N steps (0 = no trace) */
        int flush_every;  /* write buffered trace rows every N steps (and at checkpoints) */
    } trace;
} ml_config;

/* Fills cfg with the named preset. Unknown names give ML_EINPUT listing the presets. */
int config_preset(ml_config *cfg, const char *name, ml_err *err);

/* Applies one "key=value" override. Unknown keys and unparsable values name the key. "preset=NAME" resets
 * everything to that preset (so put it first). */
int config_set(ml_config *cfg, const char *assignment, ml_err *err);

/* Checks every constraint (k <= experts, dim % heads, kv_heads | heads, ...); the message names the key. */
int config_validate(const ml_config *cfg, ml_err *err);

/* Expands model.layer_top_k (or model.top_k) into k[0..layers); dense layers get 0. */
int config_layer_k(const ml_config *cfg, int *k, ml_err *err);

/* Applies a file of "key: value" lines (the config.yaml a run folder holds; '#' starts a comment).
 * Errors name the file, line and key. */
int config_read_file(ml_config *cfg, const char *path, ml_err *err);

/* Writes every key as "key: value" lines (flat YAML), in table order. */
void config_write(const ml_config *cfg, FILE *f);

/* Calls fn(key, value, ctx) for every key in table order, value formatted as in config.yaml but without
 * quotes (so "balance.aux_coef", "0.00999999978"). The params table of the run database is this list. */
void config_foreach(const ml_config *cfg, void (*fn)(const char *key, const char *value, void *ctx), void *ctx);

/* What a key holds: ML_KEY_UNKNOWN (not a key), ML_KEY_TEXT (a string such as balance.policy or a list
 * expression) or ML_KEY_VALUE (a number, boolean or name). Experiment files may give a TEXT key a YAML list,
 * which becomes its flow text. "preset" is TEXT. */
enum { ML_KEY_UNKNOWN = 0, ML_KEY_TEXT = 1, ML_KEY_VALUE = 2 };
int config_key_type(const char *key);

/* Prints every key with its default and meaning (for --help). */
void config_print_help(FILE *f);

/* Names of the presets, NULL-terminated. */
extern const char *const config_preset_names[];

/* Parses a Python-like list expression of ints: "[2]*8+[1]*48", "[1,2,3]", "[1]*4+[2,2]". Returns the
 * count written to out (at most cap) or ML_EINPUT with a message describing the position. */
int parse_int_list_expr(const char *expr, int *out, int cap, ml_err *err);

#endif
