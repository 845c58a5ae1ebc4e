/* plotdata.h: the numbers behind each figure kind of `moelab plot`, computed from a run's trace and written
 * as gnuplot data files (whitespace-separated columns, '#' header lines; blocks separated by two blank lines
 * where a figure has several series). The gnuplot scripts in plots/ draw them; tests check these numbers.
 * Loads are compared with the uniform share: a layer's total over its experts divided by E. Windows are rows
 * [r0, r1) of the trace (window.h); their loads are summed, as `moelab trace summary` does. */
#ifndef MOELAB_PLOTDATA_H
#define MOELAB_PLOTDATA_H

#include <stdint.h>
#include <stdio.h>

#include "err.h"

/* Log-scale heatmaps clip empty experts at 2^-PLOT_LOG_FLOOR of the uniform share. */
#define PLOT_LOG_FLOOR 6

/* One layer over training: rows "step expert z", one block per step bin (at most max_bins bins of equal
 * row count; loads summed within a bin; step = the bin's mean step). z = load / uniform share, or its log2
 * (clipped at -PLOT_LOG_FLOOR) when log. *zmax receives the largest z. A layer without routed tokens (dense)
 * is ML_EINPUT. */
int plotdata_heatmap_layer(const char *trace, int layer, int64_t r0, int64_t r1, int log, int max_bins, FILE *out,
                           double *zmax, ml_err *err);

/* Every layer at a step or over a window: rows "expert layer z", one block per expert. Layers without routed
 * tokens get NaN. */
int plotdata_heatmap_layers(const char *trace, int64_t r0, int64_t r1, int log, FILE *out, double *zmax,
                            ml_err *err);

/* Per MoE layer over the window: rows "layer min_dev max_dev maxvio" (Sigma-MoE-Tiny Fig. 2a). */
int plotdata_deviation_layers(const char *trace, int64_t r0, int64_t r1, FILE *out, ml_err *err);

/* The same over training for the given layers: one block per layer, rows "step min_dev max_dev", at most
 * max_bins bins of equal row count (loads summed within a bin). */
int plotdata_deviation_training(const char *trace, const int *layers, int nlayers, int64_t r0, int64_t r1,
                                int max_bins, FILE *out, ml_err *err);

/* Per expert, for each given layer (one block each): rows "rank f p", with f = the expert's share of the
 * window's tokens and p = its mean gate probability (the trace's gate_mean averaged over the window's rows),
 * each sorted in descending order (Fig. 2b/2c). The uniform line is 1/E. */
int plotdata_fp(const char *trace, const int *layers, int nlayers, int64_t r0, int64_t r1, FILE *out, ml_err *err);

/* Per-step MaxVio of one layer over training (for `plot maxvio --layer`), binned like the heatmap (the mean
 * of a bin's per-step MaxVio at the bin's mean step), and the MaxVio of the last evaluation within each bin
 * (NaN where there was none). x, y, v are malloc'd (*n entries). */
int plotdata_layer_maxvio(const char *trace, int layer, int max_bins, double **x, double **y, double **v, int *n,
                          ml_err *err);

#endif
