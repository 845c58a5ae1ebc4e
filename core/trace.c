/* trace.c: the per-run HDF5 load trace (layout in trace.h). The writer keeps appended rows in memory and at
 * each flush opens the file, extends every dataset, writes the new rows as one hyperslab per dataset and
 * closes it, so the file on disk is always a closed, consistent HDF5 file. The readers open, read one
 * selection and close. Metrics over the loads are analysis/metrics.c's business, not this file's. */
#include "trace.h"

#include <errno.h>
#include <hdf5.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- the schema: one table of columns per row kind */

typedef enum { T_I64, T_I32, T_F32 } elem_type;
typedef enum { S_ROW, S_LAYER, S_EXPERT } row_shape; /* a row is (), (L) or (L,E) */

typedef struct {
    const char *name;
    elem_type type;
    row_shape shape;
} column;

/* The first column of each table is its step: flush writes it last, so the length of /step (/eval/step) is
 * the number of complete rows even if a flush stopped half-way, and resume cuts every column to it. */
static const column step_columns[] = {
    {"step", T_I64, S_ROW},         {"tokens", T_I64, S_ROW},     {"loss", T_F32, S_ROW},
    {"lr", T_F32, S_ROW},           {"grad_norm", T_F32, S_ROW},  {"policy_loss", T_F32, S_LAYER},
    {"load", T_I32, S_EXPERT},      {"selected", T_I32, S_EXPERT}, {"gate_mean", T_F32, S_EXPERT},
    {"bias", T_F32, S_EXPERT},      {"topk", T_I32, S_LAYER},     {"dropped", T_I32, S_LAYER},
};
static const column eval_columns[] = {
    {"eval/step", T_I64, S_ROW},
    {"eval/loss", T_F32, S_ROW},
    {"eval/load", T_I32, S_EXPERT},
    {"eval/gate_mean", T_F32, S_EXPERT},
};
enum {
    NSTEP_COLUMNS = sizeof step_columns / sizeof *step_columns,
    NEVAL_COLUMNS = sizeof eval_columns / sizeof *eval_columns,
    MAX_COLUMNS = NSTEP_COLUMNS,
};

/* Chunks hold rows of ONE layer, so reading one layer over a whole run touches only that layer's chunks.
 * Step chunks are 64 rows deep, the default trace.flush_every: a flush then writes whole chunks, and since
 * file space is never reused (create_trace) a flush that ended mid-chunk would leave the superseded partial
 * chunk behind. Measured (tests/bench/trace_bench.c, small-cpu shape, 10k steps): 256-row chunks flushed
 * every 20 steps left a 204 MB file for 26 MB of data. Evaluations are ~100x rarer than steps. */
enum {
    CHUNK_STEPS = 64,         /* (N) and (N,L) step columns */
    CHUNK_STEPS_EXPERT = 64,  /* (N,L,E) step columns: chunk (64, 1, E) */
    CHUNK_EVALS = 64,
    CHUNK_EVALS_EXPERT = 16,
};

/* How long an open waits for another process's lock on the file (HDF5 locks it while open: shared for
 * readers, exclusive for the writer) before giving up. */
enum { WRITER_WAIT_MS = 2000, READER_WAIT_MS = 10000 };

typedef struct {
    const column *cols;
    int ncols;
    int64_t rows, cap;
    char *data[MAX_COLUMNS]; /* column i: rows x row_bytes(i) */
} row_buffer;

struct ml_trace {
    char *path;
    int L, E;
    int64_t last_step; /* appended steps must increase */
    row_buffer steps, evals;
};

static size_t elem_size(elem_type t) { return t == T_I64 ? 8 : 4; }

static hid_t mem_type(elem_type t) {
    return t == T_I64 ? H5T_NATIVE_INT64 : t == T_I32 ? H5T_NATIVE_INT32 : H5T_NATIVE_FLOAT;
}

static hid_t file_type(elem_type t) {
    return t == T_I64 ? H5T_STD_I64LE : t == T_I32 ? H5T_STD_I32LE : H5T_IEEE_F32LE;
}

static const char *type_name(elem_type t) { return t == T_I64 ? "int64" : t == T_I32 ? "int32" : "float32"; }

static size_t row_elems(const column *c, int L, int E) {
    return c->shape == S_ROW ? 1 : c->shape == S_LAYER ? (size_t)L : (size_t)L * (size_t)E;
}

static int is_eval(const column *c) { return c >= eval_columns && c < eval_columns + NEVAL_COLUMNS; }

static const column *find_column(const char *name) {
    if (name && name[0] == '/') name++;
    for (int i = 0; i < NSTEP_COLUMNS; i++)
        if (!strcmp(step_columns[i].name, name)) return &step_columns[i];
    for (int i = 0; i < NEVAL_COLUMNS; i++)
        if (!strcmp(eval_columns[i].name, name)) return &eval_columns[i];
    return NULL;
}

/* dims and chunk dims of column c; returns the rank */
static int column_dims(const column *c, int L, int E, hsize_t rows, hsize_t dims[3], hsize_t chunk[3]) {
    int eval = is_eval(c);
    dims[0] = rows;
    dims[1] = (hsize_t)L;
    dims[2] = (hsize_t)E;
    chunk[0] = c->shape == S_EXPERT ? (eval ? CHUNK_EVALS_EXPERT : CHUNK_STEPS_EXPERT)
                                    : (eval ? CHUNK_EVALS : CHUNK_STEPS);
    chunk[1] = c->shape == S_EXPERT ? 1 : (hsize_t)L;
    chunk[2] = (hsize_t)E;
    return c->shape == S_ROW ? 1 : c->shape == S_LAYER ? 2 : 3;
}

/* ---- HDF5 plumbing */

/* HDF5 prints its error stack to stderr by default. Errors here are values, so a silent handler replaces the
 * printer and keeps the most specific message of the first HDF5 call that failed since the entry point
 * began, for the ml_err message. One static record: the serial HDF5 library is not thread-safe either. */
static struct {
    int set, lock;
    char why[400];
} h5_failure;

static herr_t keep_innermost(unsigned n, const H5E_error2_t *e, void *data) {
    (void)data;
    const char *desc = e->desc ? e->desc : "unknown error";
    if (strstr(desc, "unable to lock")) h5_failure.lock = 1;
    if (n > 0) return 0;
    /* system errors arrive as "..., errno = 2, error message = 'No such file or directory', ...": keep the
     * words a reader needs */
    const char *msg = strstr(desc, "error message = '");
    if (msg) {
        msg += strlen("error message = '");
        const char *end = strchr(msg, '\'');
        snprintf(h5_failure.why, sizeof h5_failure.why, "%.*s", end ? (int)(end - msg) : 200, msg);
    } else {
        snprintf(h5_failure.why, sizeof h5_failure.why, "%s", desc);
    }
    return 0;
}

static herr_t record_failure(hid_t stack, void *data) {
    (void)data;
    if (!h5_failure.set) {
        h5_failure.set = 1;
        H5Ewalk2(stack, H5E_WALK_UPWARD, keep_innermost, NULL);
    }
    return 0;
}

static void forget_failure(void) { memset(&h5_failure, 0, sizeof h5_failure); }

/* Every entry point calls it: quiets HDF5 and starts a fresh failure record. */
static void quiet_hdf5(void) {
    H5Eset_auto2(H5E_DEFAULT, record_failure, NULL);
    forget_failure();
}

/* "path: what (HDF5: the first failure's reason)" */
static int h5_err(ml_err *err, int code, const char *path, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int h5_err(ml_err *err, int code, const char *path, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    int rc = ml_errf(err, code, "%s: %s (HDF5: %s)", path, what, h5_failure.set ? h5_failure.why : "no detail");
    forget_failure();
    return rc;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static hid_t file_access_plist(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    /* closing the file closes every object still open in it, so an error path cannot leave it open */
    if (fapl >= 0) H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG);
    return fapl;
}

/* H5Fopen, waiting up to wait_ms while another process holds a conflicting lock on the file (a reader
 * during a flush, or the writer during a read). On failure h5_failure says why. */
static hid_t open_file(const char *path, unsigned flags, int wait_ms) {
    hid_t fapl = file_access_plist();
    hid_t f = -1;
    for (int waited = 0, pause = 5;; waited += pause, pause = pause < 100 ? 2 * pause : pause) {
        forget_failure();
        f = H5Fopen(path, flags, fapl);
        if (f >= 0 || waited >= wait_ms || !h5_failure.lock) break;
        sleep_ms(pause);
    }
    H5Pclose(fapl);
    return f;
}

/* Dataset access without a chunk cache: every open reads or writes one hyperslab per dataset, which touches
 * each chunk once, so a cache only adds a copy (measured: flushes 7% faster without, the slowest 35%; reads
 * the same). */
static hid_t open_dataset(hid_t file, const column *c) {
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
    if (dapl >= 0) H5Pset_chunk_cache(dapl, H5D_CHUNK_CACHE_NSLOTS_DEFAULT, 0, H5D_CHUNK_CACHE_W0_DEFAULT);
    hid_t d = H5Dopen2(file, c->name, dapl);
    H5Pclose(dapl);
    return d;
}

/* Rows of dataset d; -1 on error. */
static int64_t dataset_rows(hid_t d) {
    hid_t s = H5Dget_space(d);
    hsize_t dims[3] = {0, 0, 0};
    int rank = s >= 0 ? H5Sget_simple_extent_ndims(s) : -1;
    if (rank >= 1 && rank <= 3) H5Sget_simple_extent_dims(s, dims, NULL);
    if (s >= 0) H5Sclose(s);
    return rank >= 1 && rank <= 3 ? (int64_t)dims[0] : -1;
}

/* Checks that d has c's rank, type class and (L,E) shape. */
static int check_dataset(hid_t d, const column *c, int L, int E, const char *path, ml_err *err) {
    hsize_t want[3], chunk[3], dims[3] = {0, 0, 0};
    int rank = column_dims(c, L, E, 0, want, chunk);
    hid_t s = H5Dget_space(d), type = H5Dget_type(d);
    int got_rank = s >= 0 ? H5Sget_simple_extent_ndims(s) : -1;
    if (got_rank == rank) H5Sget_simple_extent_dims(s, dims, NULL);
    H5T_class_t cls = type >= 0 ? H5Tget_class(type) : H5T_NO_CLASS;
    if (s >= 0) H5Sclose(s);
    if (type >= 0) H5Tclose(type);
    if (cls != (c->type == T_F32 ? H5T_FLOAT : H5T_INTEGER))
        return ml_errf(err, ML_EINPUT, "%s: damaged trace: /%s is not %s", path, c->name,
                       c->type == T_F32 ? "a float dataset" : "an integer dataset");
    if (got_rank != rank || (rank >= 2 && dims[1] != want[1]) || (rank == 3 && dims[2] != want[2]))
        return ml_errf(err, ML_EINPUT, "%s: damaged trace: /%s has rank %d, want %d with %d layers x %d experts", path,
                       c->name, got_rank, rank, L, E);
    return ML_OK;
}

/* Reads rows [row0, row0+n) of dataset d (column c), all layers or just `layer` (>= 0), converted to the
 * memory type of `type`. */
static herr_t read_hyperslab(hid_t d, const column *c, int L, int E, int layer, int64_t row0, int64_t n,
                             elem_type type, void *out) {
    hsize_t dims[3], chunk[3];
    int rank = column_dims(c, L, E, 0, dims, chunk);
    hsize_t start[3] = {(hsize_t)row0, layer >= 0 ? (hsize_t)layer : 0, 0};
    hsize_t count[3] = {(hsize_t)n, layer >= 0 ? 1 : dims[1], dims[2]};
    hid_t s = H5Dget_space(d), m = H5Screate_simple(rank, count, NULL);
    herr_t rc = s >= 0 && m >= 0 ? H5Sselect_hyperslab(s, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
    if (rc >= 0) rc = H5Dread(d, mem_type(type), m, s, H5P_DEFAULT, out);
    if (m >= 0) H5Sclose(m);
    if (s >= 0) H5Sclose(s);
    return rc;
}

/* ---- attributes */

static int write_int_attr(hid_t obj, const char *name, int v) {
    hid_t s = H5Screate(H5S_SCALAR);
    hid_t a = s >= 0 ? H5Acreate2(obj, name, H5T_STD_I32LE, s, H5P_DEFAULT, H5P_DEFAULT) : -1;
    herr_t rc = a >= 0 ? H5Awrite(a, H5T_NATIVE_INT, &v) : -1;
    if (a >= 0) rc |= H5Aclose(a);
    if (s >= 0) H5Sclose(s);
    return rc < 0 ? -1 : 0;
}

/* Variable-length UTF-8, which h5py reads as str. */
static int write_string_attr(hid_t obj, const char *name, const char *v) {
    hid_t type = H5Tcopy(H5T_C_S1);
    hid_t s = H5Screate(H5S_SCALAR);
    herr_t rc = type >= 0 && s >= 0 ? 0 : -1;
    if (rc == 0) rc = H5Tset_size(type, H5T_VARIABLE);
    if (rc == 0) rc = H5Tset_cset(type, H5T_CSET_UTF8);
    hid_t a = rc == 0 ? H5Acreate2(obj, name, type, s, H5P_DEFAULT, H5P_DEFAULT) : -1;
    if (a >= 0) rc = H5Awrite(a, type, &v);
    else rc = -1;
    if (a >= 0) rc |= H5Aclose(a);
    if (s >= 0) H5Sclose(s);
    if (type >= 0) H5Tclose(type);
    return rc < 0 ? -1 : 0;
}

/* A scalar integer attribute: 0 ok, 1 missing, -1 not a single integer. */
static int read_int_attr(hid_t obj, const char *name, int64_t *v) {
    if (H5Aexists(obj, name) <= 0) return 1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    hid_t type = a >= 0 ? H5Aget_type(a) : -1, s = a >= 0 ? H5Aget_space(a) : -1;
    int ok = type >= 0 && s >= 0 && H5Tget_class(type) == H5T_INTEGER && H5Sget_simple_extent_npoints(s) == 1;
    if (ok) ok = H5Aread(a, H5T_NATIVE_INT64, v) >= 0;
    if (s >= 0) H5Sclose(s);
    if (type >= 0) H5Tclose(type);
    if (a >= 0) H5Aclose(a);
    return ok ? 0 : -1;
}

/* A scalar string attribute, variable-length (what trace_open writes) or fixed-length (what other writers
 * may use), as malloc'd text: 0 ok, 1 missing, -1 not a string. */
static int read_string_attr(hid_t obj, const char *name, char **v) {
    *v = NULL;
    if (H5Aexists(obj, name) <= 0) return 1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    hid_t type = a >= 0 ? H5Aget_type(a) : -1, s = a >= 0 ? H5Aget_space(a) : -1;
    int ok = type >= 0 && s >= 0 && H5Tget_class(type) == H5T_STRING && H5Sget_simple_extent_npoints(s) == 1;
    hid_t mem = ok ? H5Tcopy(H5T_C_S1) : -1;
    if (ok && H5Tis_variable_str(type) > 0) {
        char *text = NULL;
        ok = H5Tset_size(mem, H5T_VARIABLE) >= 0 && H5Tset_cset(mem, H5Tget_cset(type)) >= 0 &&
             H5Aread(a, mem, &text) >= 0;
        if (ok) *v = strdup(text ? text : "");
        if (text) H5free_memory(text);
    } else if (ok) {
        size_t n = H5Tget_size(type);
        *v = calloc(n + 1, 1);
        ok = *v && H5Tset_size(mem, n + 1) >= 0 && H5Tset_strpad(mem, H5T_STR_NULLTERM) >= 0 &&
             H5Tset_cset(mem, H5Tget_cset(type)) >= 0 && H5Aread(a, mem, *v) >= 0;
    }
    if (mem >= 0) H5Tclose(mem);
    if (s >= 0) H5Sclose(s);
    if (type >= 0) H5Tclose(type);
    if (a >= 0) H5Aclose(a);
    if (ok && !*v) ok = 0;
    if (!ok) free(*v), *v = NULL;
    return ok ? 0 : -1;
}

/* Validates the root attributes and fills info (run_id truncated to fit) with the row counts of /step and
 * /eval/step. */
static int read_header(hid_t file, const char *path, ml_trace_info *info, ml_err *err) {
    memset(info, 0, sizeof *info);
    int64_t version, layers, experts;
    int rc = read_int_attr(file, "schema_version", &version);
    if (rc == 1)
        return ml_errf(err, ML_EINPUT, "%s: not a moelab trace (an HDF5 file without a schema_version attribute)",
                       path);
    if (rc < 0 || version < 1)
        return ml_errf(err, ML_EINPUT, "%s: not a moelab trace (schema_version is not a positive integer)", path);
    if (version > ML_TRACE_SCHEMA)
        return ml_errf(err, ML_EINPUT, "%s: trace schema_version %lld is newer than this moelab reads (%d)", path,
                       (long long)version, ML_TRACE_SCHEMA);
    const char *names[2] = {"layers", "experts"};
    int64_t *vals[2] = {&layers, &experts};
    for (int i = 0; i < 2; i++) {
        rc = read_int_attr(file, names[i], vals[i]);
        if (rc != 0 || *vals[i] < 1 || *vals[i] > (1 << 20))
            return ml_errf(err, ML_EINPUT, "%s: damaged trace: attribute %s is %s", path, names[i],
                           rc == 1 ? "missing" : "not a positive integer");
    }
    char *run_id;
    rc = read_string_attr(file, "run_id", &run_id);
    if (rc != 0)
        return ml_errf(err, ML_EINPUT, "%s: damaged trace: attribute run_id is %s", path,
                       rc == 1 ? "missing" : "not a string");
    snprintf(info->run_id, sizeof info->run_id, "%s", run_id);
    free(run_id);
    info->schema = (int)version;
    info->L = (int)layers;
    info->E = (int)experts;

    for (int eval = 0; eval < 2; eval++) {
        const column *c = eval ? &eval_columns[0] : &step_columns[0];
        hid_t d = H5Dopen2(file, c->name, H5P_DEFAULT);
        int64_t rows = d >= 0 ? dataset_rows(d) : -1;
        if (d >= 0) H5Dclose(d);
        if (rows < 0) return h5_err(err, ML_EINPUT, path, "damaged trace: cannot read /%s", c->name);
        *(eval ? &info->nevals : &info->nsteps) = rows;
    }
    return ML_OK;
}

/* Opens an existing trace (read-only or for writing) and validates its header. Missing, not HDF5, foreign or
 * newer: ML_EINPUT. */
static int open_trace(const char *path, unsigned flags, hid_t *file, ml_trace_info *info, ml_err *err) {
    *file = -1;
    struct stat st;
    if (stat(path, &st) != 0) return ml_errf(err, ML_EINPUT, "%s: cannot open trace: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return ml_errf(err, ML_EINPUT, "%s: not a regular file (so not a moelab trace)", path);
    htri_t is = H5Fis_hdf5(path);
    if (is == 0) return ml_errf(err, ML_EINPUT, "%s: not an HDF5 file (so not a moelab trace)", path);
    if (is < 0) return h5_err(err, ML_EINPUT, path, "cannot read the file");
    hid_t f = open_file(path, flags, flags == H5F_ACC_RDONLY ? READER_WAIT_MS : WRITER_WAIT_MS);
    if (f < 0)
        return h5_err(err, ML_EINPUT, path, "cannot open trace %s", flags == H5F_ACC_RDONLY ? "for reading" : "for writing");
    int rc = read_header(f, path, info, err);
    if (rc) {
        H5Fclose(f);
        return rc;
    }
    *file = f;
    return ML_OK;
}

/* ---- writing */

static int filters_available(void) {
    unsigned deflate = 0, shuffle = 0;
    if (H5Zfilter_avail(H5Z_FILTER_DEFLATE) <= 0 || H5Zfilter_avail(H5Z_FILTER_SHUFFLE) <= 0) return 0;
    if (H5Zget_filter_info(H5Z_FILTER_DEFLATE, &deflate) < 0 || H5Zget_filter_info(H5Z_FILTER_SHUFFLE, &shuffle) < 0)
        return 0;
    return (deflate & H5Z_FILTER_CONFIG_ENCODE_ENABLED) && (shuffle & H5Z_FILTER_CONFIG_ENCODE_ENABLED);
}

static int create_dataset(hid_t file, const column *c, int L, int E, int compress) {
    hsize_t dims[3], maxdims[3], chunk[3];
    int rank = column_dims(c, L, E, 0, dims, chunk);
    memcpy(maxdims, dims, sizeof dims);
    maxdims[0] = H5S_UNLIMITED;
    hid_t s = H5Screate_simple(rank, dims, maxdims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    herr_t rc = s >= 0 && dcpl >= 0 ? H5Pset_chunk(dcpl, rank, chunk) : -1;
    /* shuffle + deflate level 1: measured on synthetic 56 x 96 loads, int32 loads shrink 4.4x and float
     * gate means and biases 1.6-1.8x at ~90 MB/s; higher levels buy little for a run's flush time */
    if (rc >= 0 && compress) rc = H5Pset_shuffle(dcpl);
    if (rc >= 0 && compress) rc = H5Pset_deflate(dcpl, 1);
    if (rc >= 0) rc = H5Pset_obj_track_times(dcpl, 0); /* same rows, same bytes */
    hid_t d = rc >= 0 ? H5Dcreate2(file, c->name, file_type(c->type), s, H5P_DEFAULT, dcpl, H5P_DEFAULT) : -1;
    if (d >= 0) rc = H5Dclose(d);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (s >= 0) H5Sclose(s);
    return d >= 0 && rc >= 0 ? 0 : -1;
}

/* Creates the empty trace under path.tmp and renames it to path, so a half-created file never appears. */
static int create_trace(const ml_trace *t, const char *run_id, const char *config_text, ml_err *err) {
    size_t n = strlen(t->path) + 5;
    char *tmp = malloc(n);
    if (!tmp) return ml_errf(err, ML_ERUN, "%s: out of memory", t->path);
    snprintf(tmp, n, "%s.tmp", t->path);
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), fapl = file_access_plist();
    /* Every flush rewrites the partial last chunk of each column, which moves when it grows. Space is never
     * reused: a kill -9 in the middle of a flush then cannot overwrite data the file's last consistent index
     * still points to (measured: 40 of 40 traces killed mid-flush open intact, against 2-3 of 40 with
     * free-space reuse). The price is file size: the superseded partial chunks stay behind (1.4-3.7x). */
    if (fcpl >= 0) H5Pset_file_space_strategy(fcpl, H5F_FSPACE_STRATEGY_NONE, 0, 1);
    hid_t f = fcpl >= 0 && fapl >= 0 ? H5Fcreate(tmp, H5F_ACC_TRUNC, fcpl, fapl) : -1;
    if (fcpl >= 0) H5Pclose(fcpl);
    if (fapl >= 0) H5Pclose(fapl);
    if (f < 0) {
        int rc = h5_err(err, ML_EINPUT, t->path, "cannot create trace %s", tmp);
        free(tmp);
        return rc;
    }
    int ok = write_int_attr(f, "schema_version", ML_TRACE_SCHEMA) == 0 &&
             write_string_attr(f, "run_id", run_id ? run_id : "") == 0 &&
             write_string_attr(f, "config", config_text ? config_text : "") == 0 &&
             write_int_attr(f, "layers", t->L) == 0 && write_int_attr(f, "experts", t->E) == 0;
    hid_t g = ok ? H5Gcreate2(f, "eval", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) : -1;
    ok = g >= 0 && H5Gclose(g) >= 0;
    int compress = filters_available();
    for (int i = 0; ok && i < NSTEP_COLUMNS; i++) ok = create_dataset(f, &step_columns[i], t->L, t->E, compress) == 0;
    for (int i = 0; ok && i < NEVAL_COLUMNS; i++) ok = create_dataset(f, &eval_columns[i], t->L, t->E, compress) == 0;
    int rc = ML_OK;
    if (!ok) rc = h5_err(err, ML_EINPUT, t->path, "cannot write the empty trace into %s", tmp);
    if (H5Fclose(f) < 0 && rc == ML_OK) rc = h5_err(err, ML_EINPUT, t->path, "cannot close %s", tmp);
    if (rc == ML_OK && rename(tmp, t->path) != 0)
        rc = ml_errf(err, ML_EINPUT, "%s: cannot rename %s into place: %s", t->path, tmp, strerror(errno));
    if (rc != ML_OK) unlink(tmp);
    free(tmp);
    return rc;
}

/* Sets every column of a table to `rows` rows (shrinking drops rows, growing adds fill-value rows). */
static int set_rows(hid_t file, const column *cols, int ncols, int L, int E, int64_t rows, const char *path,
                    ml_err *err) {
    for (int i = 0; i < ncols; i++) {
        hsize_t dims[3], chunk[3];
        column_dims(&cols[i], L, E, (hsize_t)rows, dims, chunk);
        hid_t d = H5Dopen2(file, cols[i].name, H5P_DEFAULT);
        int rc = d >= 0 ? check_dataset(d, &cols[i], L, E, path, err) : ML_OK;
        if (rc) return H5Dclose(d), rc;
        herr_t hrc = d >= 0 ? H5Dset_extent(d, dims) : -1;
        if (d >= 0) hrc |= H5Dclose(d);
        if (hrc < 0) return h5_err(err, ML_EINPUT, path, "cannot resize /%s to %lld rows", cols[i].name, (long long)rows);
    }
    return ML_OK;
}

/* Rows before the first with step > resume_step (the steps of a table increase). */
static int rows_through(hid_t file, const char *name, int64_t nrows, int64_t resume_step, int64_t *keep,
                        int64_t *last_step, const char *path, ml_err *err) {
    *keep = 0;
    if (nrows == 0) return ML_OK;
    int64_t *steps = malloc((size_t)nrows * sizeof *steps);
    if (!steps) return ml_errf(err, ML_ERUN, "%s: out of memory reading /%s", path, name);
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT);
    hid_t s = d >= 0 ? H5Dget_space(d) : -1;
    hsize_t start[1] = {0}, count[1] = {(hsize_t)nrows};
    hid_t m = H5Screate_simple(1, count, NULL);
    herr_t rc = s >= 0 && m >= 0 ? H5Sselect_hyperslab(s, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
    if (rc >= 0) rc = H5Dread(d, H5T_NATIVE_INT64, m, s, H5P_DEFAULT, steps);
    if (m >= 0) H5Sclose(m);
    if (s >= 0) H5Sclose(s);
    if (d >= 0) H5Dclose(d);
    if (rc < 0) return free(steps), h5_err(err, ML_EINPUT, path, "cannot read /%s", name);
    while (*keep < nrows && steps[*keep] <= resume_step) (*keep)++;
    if (last_step && *keep > 0) *last_step = steps[*keep - 1];
    free(steps);
    return ML_OK;
}

/* The chunks resuming touches: cutting to `keep` rows rewrites the chunk holding row `keep` and keeps the one
 * holding row keep-1. They are read whole, read-only, so that a trace damaged by a kill during a flush (which
 * can leave the tail chunks unreadable) is refused before the file is opened for writing: HDF5 may fail to
 * close a damaged file it has modified. */
static int check_tail(hid_t file, const column *cols, int ncols, int L, int E, int64_t nrows, int64_t keep,
                      const char *path, ml_err *err) {
    for (int i = 0; i < ncols && nrows > 0; i++) {
        hsize_t dims[3], chunk[3];
        column_dims(&cols[i], L, E, 0, dims, chunk);
        int64_t c = (int64_t)chunk[0], lo = keep > 0 ? (keep - 1) / c * c : 0;
        int64_t hi = keep / c * c + c < nrows ? keep / c * c + c : nrows;
        void *buf = malloc((size_t)(hi - lo) * row_elems(&cols[i], L, E) * elem_size(cols[i].type));
        if (!buf) return ml_errf(err, ML_ERUN, "%s: out of memory checking /%s", path, cols[i].name);
        hid_t d = open_dataset(file, &cols[i]);
        int rc = d >= 0 ? check_dataset(d, &cols[i], L, E, path, err) : ML_OK;
        if (!rc && (d < 0 || dataset_rows(d) < nrows ||
                    read_hyperslab(d, &cols[i], L, E, -1, lo, hi - lo, cols[i].type, buf) < 0))
            rc = h5_err(err, ML_EINPUT, path,
                        "damaged trace (was its writer killed during a flush?): cannot read rows [%lld, %lld) of "
                        "/%s; move it away to resume without it",
                        (long long)lo, (long long)hi, cols[i].name);
        if (d >= 0) H5Dclose(d);
        free(buf);
        if (rc) return rc;
    }
    return ML_OK;
}

/* Reopens an existing trace for a resumed run: same run and shape, rows after resume_step dropped. Checked
 * read-only first, then cut in a second, writing open. */
static int resume_trace(ml_trace *t, const char *run_id, int64_t resume_step, ml_err *err) {
    hid_t f;
    ml_trace_info info;
    int rc = open_trace(t->path, H5F_ACC_RDONLY, &f, &info, err);
    if (rc) return rc;
    char *stored = NULL;
    read_string_attr(f, "run_id", &stored);
    if (!stored || strcmp(stored, run_id ? run_id : ""))
        rc = ml_errf(err, ML_EINPUT, "%s: the trace belongs to run \"%.200s\", not \"%.200s\" (resuming)", t->path,
                     stored ? stored : "", run_id ? run_id : "");
    else if (info.L != t->L || info.E != t->E)
        rc = ml_errf(err, ML_EINPUT, "%s: the trace has %d layers x %d experts, the resumed run %d x %d", t->path,
                     info.L, info.E, t->L, t->E);
    free(stored);
    int64_t keep_steps = 0, keep_evals = 0;
    if (!rc) rc = rows_through(f, "step", info.nsteps, resume_step, &keep_steps, &t->last_step, t->path, err);
    if (!rc) rc = rows_through(f, "eval/step", info.nevals, resume_step, &keep_evals, NULL, t->path, err);
    if (!rc) rc = check_tail(f, step_columns, NSTEP_COLUMNS, t->L, t->E, info.nsteps, keep_steps, t->path, err);
    if (!rc) rc = check_tail(f, eval_columns, NEVAL_COLUMNS, t->L, t->E, info.nevals, keep_evals, t->path, err);
    H5Fclose(f);
    if (rc) return rc;

    f = open_file(t->path, H5F_ACC_RDWR, WRITER_WAIT_MS);
    if (f < 0) return h5_err(err, ML_EINPUT, t->path, "cannot open the trace for writing");
    rc = set_rows(f, step_columns, NSTEP_COLUMNS, t->L, t->E, keep_steps, t->path, err);
    if (!rc) rc = set_rows(f, eval_columns, NEVAL_COLUMNS, t->L, t->E, keep_evals, t->path, err);
    if (H5Fclose(f) < 0 && !rc) rc = h5_err(err, ML_EINPUT, t->path, "cannot close the trace after cutting it");
    return rc;
}

static void free_trace(ml_trace *t) {
    for (int i = 0; i < MAX_COLUMNS; i++) {
        free(t->steps.data[i]);
        free(t->evals.data[i]);
    }
    free(t->path);
    free(t);
}

int trace_open(ml_trace **out, const char *path, const char *run_id, const char *config_text, int L, int E,
               int64_t resume_step, ml_err *err) {
    quiet_hdf5();
    /* The writer takes no file lock: a reader that keeps the file open (a notebook) must not block the run's
     * flushes. Readers see the file as of the last completed flush; one that opens during a flush may get an
     * error and should simply reopen. (An explicit HDF5_USE_FILE_LOCKING in the environment wins.) */
    setenv("HDF5_USE_FILE_LOCKING", "FALSE", 0);
    *out = NULL;
    if (L < 1 || E < 1)
        return ml_errf(err, ML_EINPUT, "%s: a trace needs at least one layer and one expert (got L=%d, E=%d)", path,
                       L, E);
    ml_trace *t = calloc(1, sizeof *t);
    if (!t || !(t->path = strdup(path))) return free(t), ml_errf(err, ML_ERUN, "%s: out of memory", path);
    t->L = L;
    t->E = E;
    t->last_step = INT64_MIN;
    t->steps = (row_buffer){.cols = step_columns, .ncols = NSTEP_COLUMNS};
    t->evals = (row_buffer){.cols = eval_columns, .ncols = NEVAL_COLUMNS};
    /* a run resumed from a checkpoint whose trace was lost still traces, from here on */
    int fresh = resume_step < 0 || access(path, F_OK) != 0;
    int rc = fresh ? create_trace(t, run_id, config_text, err) : resume_trace(t, run_id, resume_step, err);
    if (rc) return free_trace(t), rc;
    *out = t;
    return ML_OK;
}

static int buffer_reserve(row_buffer *b, int L, int E) {
    if (b->rows < b->cap) return 0;
    int64_t cap = b->cap ? 2 * b->cap : 64;
    for (int i = 0; i < b->ncols; i++) {
        char *p = realloc(b->data[i], (size_t)cap * row_elems(&b->cols[i], L, E) * elem_size(b->cols[i].type));
        if (!p) return -1;
        b->data[i] = p;
    }
    b->cap = cap;
    return 0;
}

/* Copies one row (src[i]: column i's values; NULL writes zeros). */
static void buffer_push(row_buffer *b, const void *const *src, int L, int E) {
    for (int i = 0; i < b->ncols; i++) {
        size_t n = row_elems(&b->cols[i], L, E) * elem_size(b->cols[i].type);
        char *dst = b->data[i] + (size_t)b->rows * n;
        if (src[i]) memcpy(dst, src[i], n);
        else memset(dst, 0, n);
    }
    b->rows++;
}

int trace_append(ml_trace *t, const ml_trace_row *row, ml_err *err) {
    if (row->step <= t->last_step)
        return ml_errf(err, ML_EINPUT, "%s: step %lld appended after step %lld (trace steps must increase)", t->path,
                       (long long)row->step, (long long)t->last_step);
    if (buffer_reserve(&t->steps, t->L, t->E))
        return ml_errf(err, ML_ERUN, "%s: out of memory buffering %lld trace rows", t->path, (long long)t->steps.rows);
    const void *src[NSTEP_COLUMNS] = {&row->step,     &row->tokens,   &row->loss,     &row->lr,
                                      &row->grad_norm, row->policy_loss, row->load,     row->selected,
                                      row->gate_mean, row->bias,      row->topk,      row->dropped};
    buffer_push(&t->steps, src, t->L, t->E);
    t->last_step = row->step;
    return ML_OK;
}

int trace_append_eval(ml_trace *t, int64_t step, float loss, const int32_t *load, const float *gate_mean,
                      ml_err *err) {
    if (buffer_reserve(&t->evals, t->L, t->E))
        return ml_errf(err, ML_ERUN, "%s: out of memory buffering %lld evaluations", t->path,
                       (long long)t->evals.rows);
    const void *src[NEVAL_COLUMNS] = {&step, &loss, load, gate_mean};
    buffer_push(&t->evals, src, t->L, t->E);
    return ML_OK;
}

/* Appends a table's buffered rows: each column is extended to (rows in /step) + buffered and the new rows
 * written as one hyperslab; the step column goes last (see step_columns). */
static int flush_rows(hid_t file, const ml_trace *t, const row_buffer *b, ml_err *err) {
    if (b->rows == 0) return ML_OK;
    hid_t d = open_dataset(file, &b->cols[0]);
    int64_t base = d >= 0 ? dataset_rows(d) : -1;
    if (d >= 0) H5Dclose(d);
    if (base < 0) return h5_err(err, ML_ERUN, t->path, "cannot read the length of /%s", b->cols[0].name);
    for (int k = 1; k <= b->ncols; k++) {
        const column *c = &b->cols[k % b->ncols];
        hsize_t dims[3], chunk[3], start[3] = {(hsize_t)base, 0, 0};
        int rank = column_dims(c, t->L, t->E, (hsize_t)(base + b->rows), dims, chunk);
        hsize_t count[3] = {(hsize_t)b->rows, dims[1], dims[2]};
        d = open_dataset(file, c);
        herr_t rc = d >= 0 ? H5Dset_extent(d, dims) : -1;
        hid_t s = rc >= 0 ? H5Dget_space(d) : -1;
        hid_t m = s >= 0 ? H5Screate_simple(rank, count, NULL) : -1;
        rc = m >= 0 ? H5Sselect_hyperslab(s, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
        if (rc >= 0) rc = H5Dwrite(d, mem_type(c->type), m, s, H5P_DEFAULT, b->data[k % b->ncols]);
        if (m >= 0) H5Sclose(m);
        if (s >= 0) H5Sclose(s);
        if (d >= 0 && H5Dclose(d) < 0) rc = -1;
        if (rc < 0)
            return h5_err(err, ML_ERUN, t->path, "cannot append %lld rows to /%s", (long long)b->rows, c->name);
    }
    return ML_OK;
}

int trace_flush(ml_trace *t, ml_err *err) {
    quiet_hdf5();
    if (t->steps.rows == 0 && t->evals.rows == 0) return ML_OK;
    hid_t f = open_file(t->path, H5F_ACC_RDWR, WRITER_WAIT_MS);
    if (f < 0)
        return h5_err(err, ML_ERUN, t->path, "cannot open the trace to flush %lld rows%s", (long long)t->steps.rows,
                      h5_failure.lock ? ": another process holds it open" : "");
    int rc = flush_rows(f, t, &t->steps, err);
    if (!rc) rc = flush_rows(f, t, &t->evals, err);
    if (H5Fclose(f) < 0 && !rc) rc = h5_err(err, ML_ERUN, t->path, "cannot close the trace after a flush");
    if (rc) return rc;
    t->steps.rows = t->evals.rows = 0;
    return ML_OK;
}

int trace_close(ml_trace *t, ml_err *err) {
    if (!t) return ML_OK;
    int rc = trace_flush(t, err);
    free_trace(t);
    return rc;
}

void trace_free(ml_trace *t) {
    if (t) free_trace(t);
}

/* ---- reading */

int trace_info(const char *path, ml_trace_info *info, ml_err *err) {
    quiet_hdf5();
    hid_t f;
    int rc = open_trace(path, H5F_ACC_RDONLY, &f, info, err);
    if (rc) return rc;
    H5Fclose(f);
    return ML_OK;
}

int trace_config(const char *path, char **config_text, ml_err *err) {
    quiet_hdf5();
    *config_text = NULL;
    hid_t f;
    ml_trace_info info;
    int rc = open_trace(path, H5F_ACC_RDONLY, &f, &info, err);
    if (rc) return rc;
    int got = read_string_attr(f, "config", config_text);
    H5Fclose(f);
    if (got != 0)
        return ml_errf(err, ML_EINPUT, "%s: damaged trace: attribute config is %s", path,
                       got == 1 ? "missing" : "not a string");
    return ML_OK;
}

/* Rows [row0, row0+n) of `dataset` (of element type `type` and row shape `shape`), all layers or just
 * `layer` (>= 0, (N,L,E) columns only), into out. */
static int read_rows(const char *path, const char *dataset, elem_type type, row_shape shape, int layer, int64_t row0,
                     int64_t n, void *out, ml_err *err) {
    quiet_hdf5();
    static const char *shape_names[] = {"1-D (N)", "per-layer (N,L)", "per-expert (N,L,E)"};
    const column *c = find_column(dataset);
    if (!c) return ml_errf(err, ML_EINPUT, "%s: no dataset \"%s\" in the trace schema", path, dataset ? dataset : "");
    if (c->type != type || c->shape != shape)
        return ml_errf(err, ML_EINPUT, "%s: /%s is a %s %s dataset, not %s %s", path, c->name,
                       shape_names[c->shape], type_name(c->type), shape_names[shape], type_name(type));
    hid_t f;
    ml_trace_info info;
    int rc = open_trace(path, H5F_ACC_RDONLY, &f, &info, err);
    if (rc) return rc;
    int64_t nrows = is_eval(c) ? info.nevals : info.nsteps;
    if (row0 < 0 || n < 0 || row0 > nrows || n > nrows - row0)
        rc = ml_errf(err, ML_EINPUT, "%s: rows [%lld, %lld) of /%s are out of range (it has %lld)", path,
                     (long long)row0, (long long)(row0 + n), c->name, (long long)nrows);
    else if (layer >= info.L)
        rc = ml_errf(err, ML_EINPUT, "%s: layer %d is out of range (the trace has %d layers)", path, layer, info.L);
    hid_t d = -1;
    if (!rc && n > 0) {
        d = open_dataset(f, c);
        if (d < 0) rc = h5_err(err, ML_EINPUT, path, "damaged trace: cannot open /%s", c->name);
        else rc = check_dataset(d, c, info.L, info.E, path, err);
        if (!rc && dataset_rows(d) < row0 + n)
            rc = ml_errf(err, ML_EINPUT, "%s: damaged trace: /%s is shorter than /%s", path, c->name,
                         is_eval(c) ? "eval/step" : "step");
    }
    if (!rc && n > 0 && read_hyperslab(d, c, info.L, info.E, layer, row0, n, type, out) < 0)
        rc = h5_err(err, ML_EINPUT, path, "cannot read rows [%lld, %lld) of /%s: damaged trace?", (long long)row0,
                    (long long)(row0 + n), c->name);
    if (d >= 0) H5Dclose(d);
    H5Fclose(f);
    return rc;
}

int trace_read_i64(const char *path, const char *dataset, int64_t row0, int64_t n, int64_t *out, ml_err *err) {
    return read_rows(path, dataset, T_I64, S_ROW, -1, row0, n, out, err);
}

int trace_read_f32(const char *path, const char *dataset, int64_t row0, int64_t n, float *out, ml_err *err) {
    return read_rows(path, dataset, T_F32, S_ROW, -1, row0, n, out, err);
}

static int check_layer(const char *path, int layer, ml_err *err) {
    return layer < 0 ? ml_errf(err, ML_EINPUT, "%s: layer %d is out of range", path, layer) : ML_OK;
}

int trace_read_layer_i32(const char *path, const char *dataset, int layer, int64_t row0, int64_t n, int32_t *out,
                         ml_err *err) {
    int rc = check_layer(path, layer, err);
    return rc ? rc : read_rows(path, dataset, T_I32, S_EXPERT, layer, row0, n, out, err);
}

int trace_read_layer_f32(const char *path, const char *dataset, int layer, int64_t row0, int64_t n, float *out,
                         ml_err *err) {
    int rc = check_layer(path, layer, err);
    return rc ? rc : read_rows(path, dataset, T_F32, S_EXPERT, layer, row0, n, out, err);
}

int trace_read_rows_f32(const char *path, const char *dataset, int64_t row0, int64_t n, float *out, ml_err *err) {
    return read_rows(path, dataset, T_F32, S_LAYER, -1, row0, n, out, err);
}

int trace_read_rows_i32(const char *path, const char *dataset, int64_t row0, int64_t n, int32_t *out, ml_err *err) {
    return read_rows(path, dataset, T_I32, S_LAYER, -1, row0, n, out, err);
}
