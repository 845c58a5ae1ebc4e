/* balance.c: composition of the active policies (balance.policy) and the routing-statistics buffers.
 * Each hook calls the policies that define it, in the order the config names them. */
#include <stdlib.h>
#include <string.h>

#include "policy.h"

int route_stats_alloc(ml_route_stats *s, int L, int E) {
    memset(s, 0, sizeof *s);
    s->L = L, s->E = E;
    size_t n = (size_t)L * (E > 0 ? E : 1);
    s->tokens_per_expert = calloc(n, sizeof(int64_t));
    s->selected = calloc(n, sizeof(int64_t));
    s->gate_mean_sum = calloc(n, sizeof(double));
    s->policy_loss = calloc(L, sizeof(double));
    s->dropped = calloc(L, sizeof(int64_t));
    return s->tokens_per_expert && s->selected && s->gate_mean_sum && s->policy_loss && s->dropped ? 0 : -1;
}

void route_stats_reset(ml_route_stats *s) {
    size_t n = (size_t)s->L * (s->E > 0 ? s->E : 1);
    memset(s->tokens_per_expert, 0, n * sizeof(int64_t));
    memset(s->selected, 0, n * sizeof(int64_t));
    memset(s->gate_mean_sum, 0, n * sizeof(double));
    memset(s->policy_loss, 0, s->L * sizeof(double));
    memset(s->dropped, 0, s->L * sizeof(int64_t));
    s->tokens = 0, s->micro_batches = 0;
}

void route_stats_free(ml_route_stats *s) {
    free(s->tokens_per_expert), free(s->selected), free(s->gate_mean_sum), free(s->policy_loss), free(s->dropped);
    memset(s, 0, sizeof *s);
}

const ml_policy *policy_find(const char *name) {
    for (int i = 0; ml_policies[i]; i++)
        if (!strcmp(ml_policies[i]->name, name)) return ml_policies[i];
    return NULL;
}

int balance_init(ml_balance *b, const ml_config *cfg, ml_err *err) {
    memset(b, 0, sizeof *b);
    char names[sizeof cfg->balance.policy];
    snprintf(names, sizeof names, "%s", cfg->balance.policy);
    if (!names[0]) return ml_errf(err, ML_EINPUT, "balance.policy: empty (use 'none' for no balancing)");
    for (char *save = NULL, *tok = strtok_r(names, "+", &save); tok; tok = strtok_r(NULL, "+", &save)) {
        while (*tok == ' ') tok++;
        char *end = tok + strlen(tok);
        while (end > tok && end[-1] == ' ') *--end = 0;
        const ml_policy *p = policy_find(tok);
        if (!p) {
            char list[512] = "";
            for (int i = 0; ml_policies[i]; i++) {
                strcat(list, i ? ", " : "");
                strcat(list, ml_policies[i]->name);
            }
            return ml_errf(err, ML_EINPUT, "balance.policy: unknown policy '%s' (known: %s)", tok, list);
        }
        for (int i = 0; i < b->n; i++)
            if (b->p[i] == p) return ml_errf(err, ML_EINPUT, "balance.policy: '%s' is named twice", tok);
        if (b->n == ML_MAX_POLICIES) return ml_errf(err, ML_EINPUT, "balance.policy: more than %d policies", ML_MAX_POLICIES);
        if (p->validate) {
            int rc = p->validate(cfg, err);
            if (rc) return rc;
        }
        b->p[b->n++] = p;
        b->has_loss |= p->loss != NULL;
        b->has_host_loss |= p->loss != NULL && !p->lbl && !p->z_coef && !p->tempered;
        b->has_lbl |= p->lbl != NULL;
        if (p->z_coef) b->z_coef += p->z_coef(cfg);
        if (p->tempered) b->tempered = p; /* one at most: only top1_loss has the form */
        b->has_cap |= p->cap != NULL;
        b->has_host_cap |= p->cap != NULL && !p->cap_limit;
        b->has_after_step |= p->after_step != NULL;
        if (p->assign) {
            if (b->has_assign)
                return ml_errf(err, ML_EINPUT, "balance.policy: two policies assign experts ('%s' and another)", tok);
            b->has_assign = 1;
        }
    }
    if (b->n > 1)
        for (int i = 0; i < b->n; i++)
            if (!strcmp(b->p[i]->name, "none"))
                return ml_errf(err, ML_EINPUT, "balance.policy: 'none' cannot be combined with other policies");
    return ML_OK;
}

int balance_validate(const ml_config *cfg, ml_err *err) {
    ml_balance b;
    return balance_init(&b, cfg, err);
}

int balance_max_k(const ml_config *cfg) {
    int k[ML_MAX_LAYERS], kmax = 0;
    if (config_layer_k(cfg, k, NULL)) return cfg->model.top_k;
    for (int l = 0; l < cfg->model.layers; l++) kmax = k[l] > kmax ? k[l] : kmax;
    ml_balance b;
    if (balance_init(&b, cfg, NULL)) return kmax;
    for (int i = 0; i < b.n; i++)
        if (b.p[i]->max_k) {
            int pk = b.p[i]->max_k(cfg);
            kmax = pk > kmax ? pk : kmax;
        }
    return kmax;
}

void balance_choose_k(const ml_balance *b, const ml_config *cfg, uint64_t tokens_seen, int *layer_k) {
    config_layer_k(cfg, layer_k, NULL);
    for (int i = 0; i < b->n; i++)
        if (b->p[i]->choose_k) b->p[i]->choose_k(cfg, tokens_seen, layer_k);
    for (int l = 0; l < cfg->model.dense_layers; l++) layer_k[l] = 0;
}

void balance_assign(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, int32_t *idx) {
    for (int i = 0; i < b->n; i++)
        if (b->p[i]->assign) b->p[i]->assign(cfg, x, idx);
}

void balance_cap(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, int32_t *route) {
    for (int i = 0; i < b->n; i++)
        if (b->p[i]->cap) b->p[i]->cap(cfg, x, route);
}

int balance_cap_limit(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, int *by_score) {
    int limit = -1;
    *by_score = 0;
    for (int i = 0; i < b->n; i++) {
        if (!b->p[i]->cap_limit) continue;
        int score, c = b->p[i]->cap_limit(cfg, x, &score);
        if (c >= 0 && (limit < 0 || c < limit)) limit = c, *by_score = score;
    }
    return limit;
}

double balance_device_loss(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x, double zsum,
                           double *g, double *c, double *a) {
    double total = 0;
    const size_t BE = (size_t)x->B * x->E;
    for (size_t i = 0; i < BE; i++) g[i] = 0;
    for (int i = 0; i < b->n; i++)
        if (b->p[i]->lbl) b->p[i]->lbl(cfg, x, g);
    for (size_t i = 0; i < BE; i++) total += g[i] * x->seq_score_mean[i];
    if (x->M > 0) total += b->z_coef * zsum / x->M;
    *a = 0;
    if (b->tempered) total += b->tempered->tempered(cfg, x, c, a);
    return total;
}

double balance_loss(const ml_balance *b, const ml_config *cfg, const ml_balance_layer *x) {
    double total = 0;
    for (int i = 0; i < b->n; i++)
        if (b->p[i]->loss) total += b->p[i]->loss(cfg, x);
    return total;
}

void balance_after_step(const ml_balance *b, const ml_config *cfg, const ml_route_stats *stats, const int *layer_k,
                        float *bias) {
    for (int i = 0; i < b->n; i++)
        if (b->p[i]->after_step) b->p[i]->after_step(cfg, stats, layer_k, bias);
}

void balance_print_help(FILE *f) {
    fprintf(f, "Balancing policies (balance.policy=NAME[+NAME...], e.g. aux_loss+z_loss+topk_schedule):\n");
    for (int i = 0; ml_policies[i]; i++) {
        const ml_policy *p = ml_policies[i];
        fprintf(f, "\n  %-16s %s\n", p->name, p->summary);
        if (p->keys && p->keys[0]) {
            fprintf(f, "  %-16s keys:", "");
            for (int k = 0; p->keys[k]; k++) fprintf(f, " %s", p->keys[k]);
            fputc('\n', f);
        }
    }
    fprintf(f, "\nEach key's default and meaning: moelab train --help-config\n");
}
