/* ops_types.h: small parameter structs shared by the backends' op signatures. */
#ifndef MOELAB_OPS_TYPES_H
#define MOELAB_OPS_TYPES_H

/* How the router turns logits into expert choices and gate values (see router_forward). */
typedef struct {
    int E, k;
    int score;         /* enum ml_score */
    int softmax_order; /* enum ml_softmax_order */
    int norm_topk;
    float route_scale;
    int given_idx;     /* 1: idx is already filled (a policy assigned the experts); compute scores and gates only */
} ml_router_params;

#endif
