/* forced_balance.c: the performance control: experts are assigned regardless of the router, round-robin
 * ((m k + j) mod E) or uniformly at random (k distinct experts per token), so every expert gets its even
 * share. The gates are still the router's scores of the assigned experts, so the model trains; what it
 * measures is the speed of perfectly balanced routing. */
#include "policy.h"
#include "rng.h"

static void assign(const ml_config *cfg, const ml_balance_layer *x, int32_t *idx) {
    const int M = x->M, k = x->k, E = x->E;
    if (cfg->balance.forced == FORCED_ROUND_ROBIN) {
        for (int m = 0; m < M; m++)
            for (int j = 0; j < k; j++) idx[(size_t)m * k + j] = (int32_t)(((size_t)m * k + j) % E);
        return;
    }
    ml_rng rng;
    rng_seed(&rng, x->stream);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < k; j++) {
            int e, dup;
            do {
                e = (int)(rng_next(&rng) % (uint64_t)E);
                dup = 0;
                for (int i = 0; i < j; i++) dup |= idx[(size_t)m * k + i] == e;
            } while (dup);
            idx[(size_t)m * k + j] = e;
        }
}

const ml_policy policy_forced_balance = {
    .name = "forced_balance",
    .summary = "assign experts round-robin or at random, ignoring the router (the balanced-speed control)",
    .keys = (const char *const[]){"balance.forced", NULL},
    .assign = assign,
};
