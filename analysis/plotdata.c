/* plotdata.c: data files behind the figures (see plotdata.h). */
#include "plotdata.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"
#include "trace.h"

static int check_layer(const char *trace, const ml_trace_info *info, int layer, ml_err *err) {
    if (layer < 0 || layer >= info->L)
        return ml_errf(err, ML_EINPUT, "layer %d: the trace %s has layers 0..%d", layer, trace, info->L - 1);
    return ML_OK;
}

static int check_window(const char *trace, int64_t r0, int64_t r1, ml_err *err) {
    if (r1 <= r0) return ml_errf(err, ML_EINPUT, "%s: no logged steps in the window", trace);
    return ML_OK;
}

/* A layer's loads over rows [r0, r1): malloc'd (n, E). */
static int read_loads(const char *trace, const char *dataset, int layer, int64_t r0, int64_t r1, int E,
                      int32_t **out, ml_err *err) {
    *out = malloc(sizeof(int32_t) * (size_t)(r1 - r0) * E);
    if (!*out) return ml_errf(err, ML_ERUN, "out of memory reading %s", trace);
    int rc = trace_read_layer_i32(trace, dataset, layer, r0, r1 - r0, *out, err);
    if (rc) free(*out), *out = NULL;
    return rc;
}

/* sum[e] = the loads of rows [i0, i1) of load (rows of E); returns their total. */
static double sum_rows(const int32_t *load, int64_t i0, int64_t i1, int E, double *sum) {
    double total = 0;
    for (int e = 0; e < E; e++) sum[e] = 0;
    for (int64_t i = i0; i < i1; i++)
        for (int e = 0; e < E; e++) sum[e] += load[i * E + e];
    for (int e = 0; e < E; e++) total += sum[e];
    return total;
}

static double ratio_z(double load, double uniform, int log) {
    double z = uniform > 0 ? load / uniform : 0;
    if (!log) return z;
    return z > 0 ? fmax(log2(z), -PLOT_LOG_FLOOR) : -PLOT_LOG_FLOOR;
}

int plotdata_heatmap_layer(const char *trace, int layer, int64_t r0, int64_t r1, int log, int max_bins, FILE *out,
                           double *zmax, ml_err *err) {
    ml_trace_info info;
    int rc = trace_info(trace, &info, err);
    if (!rc) rc = check_layer(trace, &info, layer, err);
    if (!rc) rc = check_window(trace, r0, r1, err);
    if (rc) return rc;
    const int E = info.E;
    const int64_t n = r1 - r0, bins = n < max_bins ? n : max_bins;
    int32_t *load;
    int64_t *step = malloc(sizeof(int64_t) * (size_t)n);
    double *sum = malloc(sizeof(double) * E);
    if ((rc = read_loads(trace, "load", layer, r0, r1, E, &load, err)) ||
        (rc = trace_read_i64(trace, "step", r0, n, step, err))) {
        free(load), free(step), free(sum);
        return rc;
    }
    double grand = 0, zhi = 0;
    for (int64_t i = 0; i < n * E; i++) grand += load[i];
    if (grand == 0) rc = ml_errf(err, ML_EINPUT, "layer %d routes no tokens in %s (a dense layer?)", layer, trace);
    fprintf(out, "# moelab plot heatmap: %s layer %d, %lld steps in %lld bins\n# step expert %s\n", trace, layer,
            (long long)n, (long long)bins, log ? "log2(load/uniform)" : "load/uniform");
    for (int64_t b = 0; b < bins && !rc; b++) {
        const int64_t i0 = b * n / bins, i1 = (b + 1) * n / bins;
        const double x = 0.5 * (double)(step[i0] + step[i1 - 1]), total = sum_rows(load, i0, i1, E, sum);
        for (int e = 0; e < E; e++) {
            double z = ratio_z(sum[e], total / E, log);
            zhi = fmax(zhi, z);
            fprintf(out, "%.6g %d %.6g\n", x, e, z);
        }
        fputc('\n', out);
    }
    *zmax = zhi;
    free(load), free(step), free(sum);
    return rc;
}

int plotdata_heatmap_layers(const char *trace, int64_t r0, int64_t r1, int log, FILE *out, double *zmax,
                            ml_err *err) {
    ml_trace_info info;
    int rc = trace_info(trace, &info, err);
    if (!rc) rc = check_window(trace, r0, r1, err);
    if (rc) return rc;
    const int L = info.L, E = info.E;
    double *sum = calloc((size_t)L * E, sizeof(double)), zhi = 0;
    for (int l = 0; l < L && !rc; l++) {
        int32_t *load;
        if ((rc = read_loads(trace, "load", l, r0, r1, E, &load, err))) break;
        for (int64_t i = 0; i < (r1 - r0) * E; i++) sum[(size_t)l * E + i % E] += load[i];
        free(load);
    }
    if (!rc) {
        fprintf(out, "# moelab plot heatmap: %s, rows %lld..%lld summed\n# expert layer %s\n", trace, (long long)r0,
                (long long)r1 - 1, log ? "log2(load/uniform)" : "load/uniform");
        for (int e = 0; e < E; e++) {
            for (int l = 0; l < L; l++) {
                double total = 0;
                for (int j = 0; j < E; j++) total += sum[(size_t)l * E + j];
                if (total == 0) {
                    fprintf(out, "%d %d NaN\n", e, l);
                    continue;
                }
                double z = ratio_z(sum[(size_t)l * E + e], total / E, log);
                zhi = fmax(zhi, z);
                fprintf(out, "%d %d %.6g\n", e, l, z);
            }
            fputc('\n', out);
        }
    }
    *zmax = zhi;
    free(sum);
    return rc;
}

/* Summed loads of a layer over rows [r0, r1) into sum (E); returns the total. */
static int layer_sums(const char *trace, int layer, int64_t r0, int64_t r1, int E, double *sum, double *total,
                      ml_err *err) {
    int32_t *load;
    int rc = read_loads(trace, "load", layer, r0, r1, E, &load, err);
    if (rc) return rc;
    *total = sum_rows(load, 0, r1 - r0, E, sum);
    free(load);
    return ML_OK;
}

int plotdata_deviation_layers(const char *trace, int64_t r0, int64_t r1, FILE *out, ml_err *err) {
    ml_trace_info info;
    int rc = trace_info(trace, &info, err);
    if (!rc) rc = check_window(trace, r0, r1, err);
    if (rc) return rc;
    double *sum = malloc(sizeof(double) * info.E), total;
    int moe = 0;
    fprintf(out, "# moelab plot deviation: %s, rows %lld..%lld summed\n# layer min_dev max_dev maxvio\n", trace,
            (long long)r0, (long long)r1 - 1);
    for (int l = 0; l < info.L && !rc; l++) {
        if ((rc = layer_sums(trace, l, r0, r1, info.E, sum, &total, err))) break;
        if (total == 0) continue; /* dense layer */
        ml_load_metrics m;
        metrics_compute(&m, sum, info.E);
        fprintf(out, "%d %.6g %.6g %.6g\n", l, m.min_dev, m.max_dev, m.maxvio);
        moe++;
    }
    if (!rc && !moe) rc = ml_errf(err, ML_EINPUT, "%s: no layer routes tokens in the window", trace);
    free(sum);
    return rc;
}

int plotdata_deviation_training(const char *trace, const int *layers, int nlayers, int64_t r0, int64_t r1,
                                int max_bins, FILE *out, ml_err *err) {
    ml_trace_info info;
    int rc = trace_info(trace, &info, err);
    if (!rc) rc = check_window(trace, r0, r1, err);
    for (int i = 0; i < nlayers && !rc; i++) rc = check_layer(trace, &info, layers[i], err);
    if (rc) return rc;
    const int E = info.E;
    const int64_t n = r1 - r0, bins = n < max_bins ? n : max_bins;
    int64_t *step = malloc(sizeof(int64_t) * (size_t)n);
    double *sum = malloc(sizeof(double) * E);
    rc = trace_read_i64(trace, "step", r0, n, step, err);
    fprintf(out, "# moelab plot deviation over training: %s\n", trace);
    for (int j = 0; j < nlayers && !rc; j++) {
        int32_t *load;
        if ((rc = read_loads(trace, "load", layers[j], r0, r1, E, &load, err))) break;
        fprintf(out, "# layer %d\n# step min_dev max_dev\n", layers[j]);
        for (int64_t b = 0; b < bins; b++) {
            const int64_t i0 = b * n / bins, i1 = (b + 1) * n / bins;
            sum_rows(load, i0, i1, E, sum);
            ml_load_metrics m;
            metrics_compute(&m, sum, E);
            if (m.total > 0) fprintf(out, "%.6g %.6g %.6g\n", 0.5 * (double)(step[i0] + step[i1 - 1]), m.min_dev, m.max_dev);
        }
        fprintf(out, "\n\n");
        free(load);
    }
    free(step), free(sum);
    return rc;
}

static int desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

int plotdata_fp(const char *trace, const int *layers, int nlayers, int64_t r0, int64_t r1, FILE *out, ml_err *err) {
    ml_trace_info info;
    int rc = trace_info(trace, &info, err);
    if (!rc) rc = check_window(trace, r0, r1, err);
    for (int i = 0; i < nlayers && !rc; i++) rc = check_layer(trace, &info, layers[i], err);
    if (rc) return rc;
    const int E = info.E;
    const int64_t n = r1 - r0;
    double *f = malloc(sizeof(double) * E), *p = malloc(sizeof(double) * E), total;
    float *gate = malloc(sizeof(float) * (size_t)n * E);
    fprintf(out, "# moelab plot fp: %s, rows %lld..%lld; uniform = 1/E = %.6g\n", trace, (long long)r0,
            (long long)r1 - 1, 1.0 / E);
    for (int j = 0; j < nlayers && !rc; j++) {
        const int l = layers[j];
        if ((rc = layer_sums(trace, l, r0, r1, E, f, &total, err))) break;
        if (total == 0) {
            rc = ml_errf(err, ML_EINPUT, "layer %d routes no tokens in %s (a dense layer?)", l, trace);
            break;
        }
        if ((rc = trace_read_layer_f32(trace, "gate_mean", l, r0, n, gate, err))) break;
        for (int e = 0; e < E; e++) {
            f[e] /= total;
            p[e] = 0;
        }
        for (int64_t i = 0; i < n; i++)
            for (int e = 0; e < E; e++) p[e] += gate[i * E + e];
        for (int e = 0; e < E; e++) p[e] /= (double)n;
        qsort(f, (size_t)E, sizeof *f, desc);
        qsort(p, (size_t)E, sizeof *p, desc);
        fprintf(out, "# layer %d\n# rank f p\n", l);
        for (int e = 0; e < E; e++) fprintf(out, "%d %.6g %.6g\n", e + 1, f[e], p[e]);
        fprintf(out, "\n\n");
    }
    free(f), free(p), free(gate);
    return rc;
}

int plotdata_layer_maxvio(const char *trace, int layer, int max_bins, double **x, double **y, double **v, int *nout,
                          ml_err *err) {
    ml_trace_info info;
    int rc = trace_info(trace, &info, err);
    if (!rc) rc = check_layer(trace, &info, layer, err);
    if (!rc) rc = check_window(trace, 0, info.nsteps, err);
    if (rc) return rc;
    const int E = info.E;
    const int64_t n = info.nsteps, k = info.nevals, bins = n < max_bins ? n : max_bins;
    int32_t *load = NULL, *eload = NULL;
    int64_t *step = malloc(sizeof(int64_t) * (size_t)n), *estep = malloc(sizeof(int64_t) * (size_t)(k ? k : 1));
    double *one = malloc(sizeof(double) * E);
    if ((rc = read_loads(trace, "load", layer, 0, n, E, &load, err)) ||
        (rc = trace_read_i64(trace, "step", 0, n, step, err)) ||
        (k && ((rc = read_loads(trace, "eval/load", layer, 0, k, E, &eload, err)) ||
               (rc = trace_read_i64(trace, "eval/step", 0, k, estep, err)))))
        goto out;
    *x = malloc(sizeof(double) * (size_t)bins), *y = malloc(sizeof(double) * (size_t)bins);
    *v = malloc(sizeof(double) * (size_t)bins);
    *nout = (int)bins;
    int64_t next_eval = 0;
    for (int64_t b = 0; b < bins; b++) {
        const int64_t i0 = b * n / bins, i1 = (b + 1) * n / bins;
        double vio = 0;
        for (int64_t i = i0; i < i1; i++) {
            for (int e = 0; e < E; e++) one[e] = load[i * E + e];
            ml_load_metrics m;
            metrics_compute(&m, one, E);
            vio += m.maxvio;
        }
        /* the last evaluation inside this bin, if any, shares its row */
        double val = NAN;
        while (next_eval < k && (b == bins - 1 || estep[next_eval] <= step[i1 - 1])) {
            for (int e = 0; e < E; e++) one[e] = eload[next_eval * E + e];
            ml_load_metrics m;
            metrics_compute(&m, one, E);
            val = m.maxvio;
            next_eval++;
        }
        (*x)[b] = 0.5 * (double)(step[i0] + step[i1 - 1]), (*y)[b] = vio / (double)(i1 - i0), (*v)[b] = val;
    }
out:
    free(load), free(eload), free(step), free(estep), free(one);
    return rc;
}
