/* route_ops_cpu.h: the CPU ops of the routing statistics and the balancing losses' device forms (the
 * contracts are backend.h's route_stats, lbl_backward, zloss_*, tempered_* and capacity_route). */
#ifndef MOELAB_ROUTE_OPS_CPU_H
#define MOELAB_ROUTE_OPS_CPU_H

#include <stdint.h>

void cpu_route_stats(double *psum, int32_t *selected, const float *probs, const int32_t *idx, int M, int k, int E,
                     int seg);
void cpu_lbl_backward(float *dprobs, const float *probs, const float *g, float scale, int M, int E, int seg);
void cpu_zloss_forward(double *zsum, const float *logits, int M, int E);
void cpu_zloss_backward(float *dlogits, const float *logits, float scale, int M, int E);
void cpu_tempered_forward(double *fsum, double *ssum, const float *logits, const float *probs, const int32_t *idx,
                          float tau, int M, int k, int E);
void cpu_tempered_backward(float *dlogits, float *dprobs, const float *logits, const int32_t *idx, const float *c,
                           float cscale, float a, float tau, int M, int k, int E);
void cpu_capacity_route(int32_t *route, const int32_t *idx, const float *probs, const int32_t *offsets,
                        const int32_t *slot, int cap, int by_score, int M, int k, int E);

#endif
