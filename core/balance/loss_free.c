/* loss_free.c: auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664). Each expert has a bias b_i
 * that only selects (top-k of s + b); the gate stays s. After each global batch, with load_i the tokens
 * expert i received: sign rule b_i += u * sign(mean - load_i) (the paper's, u = 1e-3), or proportional
 * b_i += u * (mean - load_i) / mean. Works with softmax and sigmoid scores. The biases are policy state:
 * they live in the model (router_bias) and in checkpoints. */
#include "policy.h"

static int validate(const ml_config *cfg, ml_err *err) {
    if (!(cfg->balance.bias_rate > 0))
        return ml_errf(err, ML_EINPUT, "balance.bias_rate: %g must be positive", cfg->balance.bias_rate);
    return ML_OK;
}

static void after_step(const ml_config *cfg, const ml_route_stats *st, const int *layer_k, float *bias) {
    const float u = cfg->balance.bias_rate;
    for (int l = 0; l < st->L; l++) {
        if (!layer_k[l]) continue;
        const int64_t *load = st->tokens_per_expert + (size_t)l * st->E;
        double total = 0;
        for (int e = 0; e < st->E; e++) total += load[e];
        if (total <= 0) continue;
        const double mean = total / st->E;
        for (int e = 0; e < st->E; e++) {
            double gap = mean - load[e];
            float *b = bias + (size_t)l * st->E + e;
            if (cfg->balance.bias_rule == BIAS_PROPORTIONAL) *b += (float)(u * gap / mean);
            else *b += gap > 0 ? u : gap < 0 ? -u : 0;
        }
    }
}

const ml_policy policy_loss_free = {
    .name = "loss_free",
    .summary = "selection bias b_i += u*sign(mean - load_i) after each global batch (arXiv 2408.15664)",
    .keys = (const char *const[]){"balance.bias_rate", "balance.bias_rule", NULL},
    .validate = validate,
    .after_step = after_step,
};
