// runtime_cuda.cu: the CUDA backend's runtime: the cuBLAS handle, memory (plain cudaMalloc at model_init,
// nothing inside a step), the scratch workspace, bf16 shadows of the fp32 master weights, the host copies of
// dispatch offsets, the per-op CUDA-event profiler, the GEMM peaks the benchmark compares with, and the two
// op tables: "cuda" (bf16 tensor-core GEMMs, fp32 master weights and everything else) and "cuda-fp32".
#include "cuda_common.cuh"

cublasHandle_t ml_blas;
static long n_allocs;

void ml_cuda_die(const char *op, const char *what) {
    fprintf(stderr, "moelab cuda: %s: %s\n", op, what);
    exit(1);
}

// ---- bf16 shadows ----

struct shadow {
    const float *p;
    size_t n;
    bf16 *bf;
};
enum { MAX_SHADOWS = 16 };
static shadow shadows[MAX_SHADOWS];

__global__ void k_cast_bf16(bf16 *dst, const float *src, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}
// four elements a thread (16-byte loads, 8-byte stores): src 16-byte and dst 8-byte aligned; the n % 4 last
// elements one a thread
__global__ void k_cast_bf16_x4(bf16 *dst, const float *src, size_t n) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, n4 = n / 4;
    if (i < n4) {
        const float4 f = ((const float4 *)src)[i];
        ((uint2 *)dst)[i] = make_uint2(ml_bf16x2(f.x, f.y), ml_bf16x2(f.z, f.w));
    } else if (i - n4 < n % 4) {
        const size_t e = 4 * n4 + (i - n4);
        dst[e] = __float2bfloat16_rn(src[e]);
    }
}
void ml_cast_bf16(const char *op, bf16 *dst, const float *src, size_t n) {
    if ((uintptr_t)src % 16 == 0 && (uintptr_t)dst % 8 == 0)
        LAUNCH(op, ml_blocks(n / 4 + n % 4), 256, k_cast_bf16_x4, dst, src, n);
    else
        LAUNCH(op, ml_blocks(n), 256, k_cast_bf16, dst, src, n);
}

bf16 *ml_shadow_range(const float *p, size_t n) {
    for (int i = 0; i < MAX_SHADOWS; i++)
        if (shadows[i].p && p >= shadows[i].p && p + n <= shadows[i].p + shadows[i].n) return shadows[i].bf + (p - shadows[i].p);
    return NULL;
}
const bf16 *ml_shadow_of(const float *w, size_t n) { return ml_shadow_range(w, n); }

// the part of [p, p + n) inside a bound range, for writers that may touch weights (from_host, memset0)
static void shadow_refresh(const char *op, const float *p, size_t n, int zero) {
    for (int i = 0; i < MAX_SHADOWS; i++) {
        const shadow *s = &shadows[i];
        if (!s->p) continue;
        const float *lo = p > s->p ? p : s->p, *hi = p + n < s->p + s->n ? p + n : s->p + s->n;
        if (lo >= hi) continue;
        bf16 *dst = s->bf + (lo - s->p);
        if (zero) CK(op, cudaMemsetAsync(dst, 0, sizeof(bf16) * (hi - lo)));
        else ml_cast_bf16(op, dst, lo, hi - lo);
    }
}

static void cu_bind_params(const float *params, size_t n) {
    int free_slot = -1;
    for (int i = 0; i < MAX_SHADOWS; i++)
        if (!shadows[i].p && free_slot < 0) free_slot = i;
    if (free_slot < 0) ml_cuda_die("bind_params", "more than 16 models bound at once");
    shadow *s = &shadows[free_slot];
    CK("bind_params", cudaMalloc(&s->bf, sizeof(bf16) * (n ? n : 1)));
    n_allocs++;
    s->p = params, s->n = n;
    ml_cast_bf16("bind_params", s->bf, params, n);
}

// ---- host copies of dispatch offsets: moe_dispatch starts an async copy into pinned memory, the grouped
// GEMMs of that layer (forward and backward) wait for it instead of copying again ----

struct offsets_copy {
    const int32_t *dev;
    int E;
    int32_t *host; // pinned, ML_CUDA_MAX_E + 1
    cudaEvent_t done;
    unsigned long long used;
};
enum { MAX_OFFSET_COPIES = 2 * ML_MAX_LAYERS + 8 };
static offsets_copy offs[MAX_OFFSET_COPIES];
static unsigned long long offs_clock;

static offsets_copy *offsets_slot(const int32_t *dev, int take) {
    offsets_copy *lru = &offs[0];
    for (int i = 0; i < MAX_OFFSET_COPIES; i++) {
        if (offs[i].dev == dev) return &offs[i];
        if (offs[i].used < lru->used) lru = &offs[i];
    }
    if (!take) return NULL;
    lru->dev = dev;
    return lru;
}
void ml_offsets_publish(const int32_t *offsets, int E) {
    offsets_copy *c = offsets_slot(offsets, 1);
    c->E = E, c->used = ++offs_clock;
    CK("moe_dispatch", cudaMemcpyAsync(c->host, offsets, sizeof(int32_t) * (E + 1), cudaMemcpyDeviceToHost, 0));
    CK("moe_dispatch", cudaEventRecord(c->done, 0));
}
const int32_t *ml_offsets_host(const char *op, const int32_t *offsets, int E) {
    offsets_copy *c = offsets_slot(offsets, 0);
    if (c && c->E == E) {
        c->used = ++offs_clock;
        CK(op, cudaEventSynchronize(c->done));
        return c->host;
    }
    // offsets that did not come from moe_dispatch (written by from_host): copy them now
    c = offsets_slot(offsets, 1);
    c->E = E, c->used = ++offs_clock;
    CK(op, cudaMemcpy(c->host, offsets, sizeof(int32_t) * (E + 1), cudaMemcpyDeviceToHost));
    return c->host;
}
// drops the copies of offsets that [lo, lo + bytes) overlaps
static void offsets_forget(const void *lo, size_t bytes) {
    const char *a = (const char *)lo, *b = a + (bytes ? bytes : 1);
    for (int i = 0; i < MAX_OFFSET_COPIES; i++) {
        const char *s = (const char *)offs[i].dev, *e = s + sizeof(int32_t) * (offs[i].E + 1);
        if (offs[i].dev && s < b && a < e) offs[i].dev = NULL, offs[i].used = 0;
    }
}
// pinned buffers and events for every slot, made once with the tables (not inside a step)
static void offsets_init(void) {
    for (int i = 0; i < MAX_OFFSET_COPIES; i++) {
        CK("init", cudaMallocHost(&offs[i].host, sizeof(int32_t) * (ML_CUDA_MAX_E + 1)));
        CK("init", cudaEventCreateWithFlags(&offs[i].done, cudaEventDisableTiming));
    }
}

// ---- memory ----

static void *cu_alloc(size_t bytes) {
    void *p = NULL;
    ml_epoch++; // a new buffer may reuse a freed one's address
    if (cudaMalloc(&p, bytes ? bytes : 64) != cudaSuccess) {
        cudaGetLastError(); // out of memory: the model reports it
        return NULL;
    }
    n_allocs++;
    CK("alloc", cudaMemset(p, 0, bytes ? bytes : 64));
    return p;
}
static void cu_free(void *p) {
    ml_epoch++;
    ml_deferred_zero_complete("free", NULL, 0); // (the block's size is not known here)
    for (int i = 0; i < MAX_SHADOWS; i++)
        if (shadows[i].p == p) {
            CK("free", cudaFree(shadows[i].bf));
            shadows[i] = shadow{};
        }
    offsets_forget(p, 1);
    CK("free", cudaFree(p));
}
// ---- deferred zeroing (the table's zero_deferred) ----
// Ranges whose zeroing waits for the grouped_matmul_backward that writes them whole (an experts' weight
// gradient: it then writes its products instead of adding them, ml_deferred_zero_take). Any other use of a
// range through the table (copies from or into it, memset0, sumsq, adamw_update; free: all of them) zeroes it
// first; memory elsewhere (the step's activations and their gradients) leaves it deferred.
enum { MAX_DEFERRED = 2 * ML_MAX_LAYERS };
static struct {
    void *p;
    size_t bytes;
} deferred[MAX_DEFERRED];
static int n_deferred;
static int overlaps(int i, const void *p, size_t bytes) {
    const char *lo = (const char *)deferred[i].p;
    return lo < (const char *)p + bytes && (const char *)p < lo + deferred[i].bytes;
}
void ml_deferred_zero_complete(const char *op, const void *p, size_t bytes) {
    for (int i = 0; i < n_deferred;)
        if (!p || overlaps(i, p, bytes)) {
            CK(op, cudaMemsetAsync(deferred[i].p, 0, deferred[i].bytes));
            deferred[i] = deferred[--n_deferred];
        } else {
            i++;
        }
}
int ml_deferred_zero_take(const void *p, size_t bytes) {
    for (int i = 0; i < n_deferred; i++)
        if (deferred[i].p == p && deferred[i].bytes == bytes) {
            deferred[i] = deferred[--n_deferred];
            return 1;
        }
    ml_deferred_zero_complete("zero_deferred", p, bytes); // a part of one: zeroed, then added to as usual
    return 0;
}
static void cu_zero_deferred(void *p, size_t bytes) {
    ml_epoch++;
    ml_deferred_zero_complete("zero_deferred", p, bytes); // no two ranges overlap
    if (n_deferred == MAX_DEFERRED) ml_deferred_zero_complete("zero_deferred", NULL, 0);
    deferred[n_deferred].p = p, deferred[n_deferred].bytes = bytes, n_deferred++;
}

static void cu_memset0(void *p, size_t bytes) {
    ml_epoch++;
    ml_deferred_zero_complete("memset0", p, bytes);
    CK("memset0", cudaMemsetAsync(p, 0, bytes));
    shadow_refresh("memset0", (const float *)p, bytes / sizeof(float), 1);
    offsets_forget(p, bytes);
}
static void cu_to_host(void *host, const void *src, size_t bytes) {
    ml_deferred_zero_complete("to_host", src, bytes);
    CK("to_host", cudaMemcpy(host, src, bytes, cudaMemcpyDeviceToHost));
}
static void cu_from_host(void *dst, const void *host, size_t bytes) {
    ml_epoch++;
    ml_deferred_zero_complete("from_host", dst, bytes);
    CK("from_host", cudaMemcpy(dst, host, bytes, cudaMemcpyHostToDevice));
    shadow_refresh("from_host", (const float *)dst, bytes / sizeof(float), 0);
    offsets_forget(dst, bytes);
}
static void cu_sync(void) { CK("sync", cudaDeviceSynchronize()); }
static void *cu_host_alloc(size_t bytes) {
    void *p = NULL;
    CK("host_alloc", cudaMallocHost(&p, bytes ? bytes : 1));
    return p;
}
static void cu_host_free(void *p) { CK("host_free", cudaFreeHost(p)); }
static void cu_to_host_async(void *host, const void *src, size_t bytes) {
    ml_deferred_zero_complete("to_host_async", src, bytes);
    CK("to_host_async", cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, 0));
}

// ---- workspace ----

static struct {
    void *p;
    size_t cap;
} ws[WS_SLOTS];

void *ml_ws(int slot, size_t bytes) {
    if (ws[slot].cap < bytes) {
        if (ws[slot].p) CK("workspace", cudaFree(ws[slot].p));
        CK("workspace", cudaMalloc(&ws[slot].p, bytes));
        n_allocs++;
        ws[slot].cap = bytes;
    }
    return ws[slot].p;
}

static int tc_attention; // the cuda table runs attention_tc.cu (not MOELAB_ATTENTION=fp32)
static int tc_attention_wanted(void) {
    const char *att = getenv("MOELAB_ATTENTION");
    return !att || strcmp(att, "fp32");
}

// the scratch each op group needs for the largest shapes the model will use (see the users of each slot), in
// bytes per workspace slot; pure arithmetic, so cuda_plan_memory can ask it without a GPU
static void workspace_need(const ml_backend_plan *p, int bf16_casts, int tc_attn, int grouped_bf16_outputs,
                           size_t need[WS_SLOTS]) {
    const size_t MK = (size_t)p->M * (p->kmax > 0 ? p->kmax : 1), E = p->E > 0 ? p->E : 1;
    for (int s = 0; s < WS_SLOTS; s++) need[s] = 0;
    if (bf16_casts) { // activations and output gradients rounded to bf16 before each GEMM
        need[WS_CAST_A] = need[WS_CAST_B] = sizeof(bf16) * p->max_gemm_floats;
        // the experts' products in bf16 before they are widened: rows x (2F or C) <= max_gemm_floats
        if (grouped_bf16_outputs) need[WS_GROUPED_OUT] = sizeof(bf16) * p->max_gemm_floats;
        // the tensor-core attention's bf16 copies of q, dO, k, v
        if (tc_attn && p->hd >= 1 && p->hd <= 128 && p->KV > 0 && p->H % p->KV == 0) {
            need[WS_ATTN] = ml_attention_stage_bytes(p->B, p->T, p->H, p->KV, p->hd);
            need[WS_ATTN_DS] = ml_attention_ds_bytes(p->B, p->T, p->H, p->KV);
        }
    }
    // route_stats: M row sums + (M/128 + B) x E partial sums and counts (chunks stop at sequence ends; the
    // z-loss's and tempered loss's (M/128 + 1) x (E + 1) partials fit too); rmsnorm dw: ML_NORM_CHUNKS x C
    // partials
    size_t reduce = sizeof(double) * p->M + (sizeof(double) + sizeof(int32_t)) * (p->M / 128 + p->B + 1) * E;
    size_t norm = sizeof(double) * ML_NORM_CHUNKS * (size_t)(p->C > p->hd ? p->C : p->hd);
    need[WS_REDUCE] = reduce > norm ? reduce : norm;
    // moe_dispatch: per-chunk counts and bases, (M k / 256 + 1) x E each
    need[WS_DISPATCH] = 2 * sizeof(int32_t) * (MK / 256 + 1) * E;
    // capacity_route by score: the choices in slot order (M k)
    need[WS_CAPACITY] = sizeof(int32_t) * MK;
}
static void prepare(const ml_backend_plan *p, int bf16_casts) {
    size_t need[WS_SLOTS];
    workspace_need(p, bf16_casts, tc_attention, bf16_casts && ml_grouped_bf16_outputs(), need);
    for (int s = 0; s < WS_SLOTS; s++)
        if (need[s]) ml_ws(s, need[s]);
}
static void cu_prepare_fp32(const ml_backend_plan *p) { prepare(p, 0); }
static void cu_prepare_bf16(const ml_backend_plan *p) { prepare(p, 1); }

// ---- profiler ----

enum { PROF_PAIRS = 1 << 15 };
static cudaEvent_t prof_start[PROF_PAIRS], prof_end[PROF_PAIRS];
static const char *prof_name[PROF_PAIRS];
static int prof_on, prof_n, prof_created;

unsigned long ml_epoch;
ml_prof_scope::ml_prof_scope(const char *op) : slot(-1) {
    if (strcmp(op, "matmul_forward") && strcmp(op, "matmul_backward")) ml_epoch++;
    if (!prof_on || prof_n >= PROF_PAIRS) return;
    slot = prof_n++;
    prof_name[slot] = op;
    CK("profile", cudaEventRecord(prof_start[slot], 0));
}
ml_prof_scope::~ml_prof_scope() {
    if (slot >= 0) CK("profile", cudaEventRecord(prof_end[slot], 0));
}

extern "C" void cuda_profile_start(void) {
    if (!prof_created) {
        for (int i = 0; i < PROF_PAIRS; i++) {
            CK("profile", cudaEventCreate(&prof_start[i]));
            CK("profile", cudaEventCreate(&prof_end[i]));
        }
        prof_created = 1;
    }
    prof_n = 0, prof_on = 1;
}

extern "C" int cuda_profile_stop(ml_op_time *out, int cap) {
    CK("profile", cudaDeviceSynchronize());
    prof_on = 0;
    int n = 0;
    for (int i = 0; i < prof_n; i++) {
        float ms;
        CK("profile", cudaEventElapsedTime(&ms, prof_start[i], prof_end[i]));
        int j = 0;
        while (j < n && strcmp(out[j].op, prof_name[i])) j++;
        if (j == n) {
            if (n == cap) continue;
            out[n++] = ml_op_time{prof_name[i], 0, 0};
        }
        out[j].ms += ms, out[j].calls++;
    }
    return n;
}

extern "C" long cuda_alloc_count(void) { return n_allocs; }

extern "C" void cuda_plan_memory(const ml_backend_plan *p, size_t nparams, int bf16_table, size_t *scratch,
                                 size_t *weight_copy) {
    size_t need[WS_SLOTS];
    workspace_need(p, bf16_table, bf16_table && tc_attention_wanted(), bf16_table && ml_grouped_bf16_outputs_planned(),
                   need);
    *scratch = ml_gemm_fixed_bytes() + ml_ops_fixed_bytes();
    for (int s = 0; s < WS_SLOTS; s++) *scratch += need[s];
    *weight_copy = bf16_table ? sizeof(bf16) * (nparams ? nparams : 1) : 0; // as cu_bind_params allocates
}
extern "C" void cuda_memory_in_use(size_t *used, size_t *total) {
    size_t free_bytes = 0;
    CK("memory", cudaMemGetInfo(&free_bytes, total));
    *used = *total - free_bytes;
}

// ---- the peak the benchmark compares with: the best of reps n^3 GEMMs (bf16 in, fp32 out and accumulate,
// as the training GEMMs; or fp32 throughout) ----

extern "C" double cuda_gemm_peak(int n, int reps, int bf16_inputs) {
    backend_cuda_fp32(); // the handle
    const size_t elt = bf16_inputs ? sizeof(bf16) : sizeof(float);
    void *a, *b, *c;
    CK("gemm_peak", cudaMalloc(&a, elt * n * n));
    CK("gemm_peak", cudaMalloc(&b, elt * n * n));
    CK("gemm_peak", cudaMalloc(&c, sizeof(float) * n * n));
    CK("gemm_peak", cudaMemset(a, 0, elt * n * n));
    CK("gemm_peak", cudaMemset(b, 0, elt * n * n));
    cudaEvent_t t0, t1;
    CK("gemm_peak", cudaEventCreate(&t0));
    CK("gemm_peak", cudaEventCreate(&t1));
    const float one = 1, zero = 0;
    const cudaDataType_t in = bf16_inputs ? CUDA_R_16BF : CUDA_R_32F;
    double best = 0;
    for (int r = 0; r < reps + 1; r++) { // the first is a warmup
        CK("gemm_peak", cudaEventRecord(t0, 0));
        BK("gemm_peak", cublasGemmEx(ml_blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a, in, n, b, in, n, &zero, c,
                                     CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        CK("gemm_peak", cudaEventRecord(t1, 0));
        CK("gemm_peak", cudaEventSynchronize(t1));
        float ms;
        CK("gemm_peak", cudaEventElapsedTime(&ms, t0, t1));
        double gf = 2.0 * n * (double)n * n / (ms * 1e-3) / 1e9;
        if (r > 0 && gf > best) best = gf;
    }
    cudaEventDestroy(t0), cudaEventDestroy(t1);
    cudaFree(a), cudaFree(b), cudaFree(c);
    return best;
}

extern "C" int cuda_available(char *why, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        snprintf(why, cap, "%s", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
        return 0;
    }
    cudaDeviceProp prop;
    CK("cuda_available", cudaGetDeviceProperties(&prop, 0));
    if (prop.major < 8) { // the kernels are built for sm_80 and sm_90 (and PTX for newer)
        snprintf(why, cap, "%s is sm_%d%d; moelab's CUDA kernels need sm_80 or newer", prop.name, prop.major,
                 prop.minor);
        return 0;
    }
    snprintf(why, cap, "%s (sm_%d%d, %.0f GiB)", prop.name, prop.major, prop.minor, prop.totalGlobalMem / 1073741824.0);
    return 1;
}

extern "C" size_t cuda_device_memory(void) {
    int n = 0;
    cudaDeviceProp prop;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0 || cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return prop.totalGlobalMem;
}

// ---- the tables ----

static void init_runtime(void) {
    if (ml_blas) return;
    BK("cublasCreate", cublasCreate(&ml_blas));
    // no TF32: the fp32 table's GEMMs are true fp32 so it matches the CPU op for op; the bf16 table asks
    // cublasGemmEx for bf16 inputs explicitly
    BK("cublasSetMathMode", cublasSetMathMode(ml_blas, CUBLAS_DEFAULT_MATH));
    ml_cuda_gemm_init();
    offsets_init();
}

static void fill_common(ml_backend *b) {
    b->alloc = cu_alloc, b->free = cu_free, b->memset0 = cu_memset0, b->zero_deferred = cu_zero_deferred;
    b->to_host = cu_to_host;
    b->from_host = cu_from_host, b->sync = cu_sync;
    b->host_alloc = cu_host_alloc, b->host_free = cu_host_free, b->to_host_async = cu_to_host_async;
    ml_cuda_fill_ops(b);
    ml_cuda_fill_attention(b);
}

extern "C" const ml_backend *backend_cuda_fp32(void) {
    static ml_backend b;
    if (!b.name) {
        init_runtime();
        fill_common(&b);
        ml_cuda_fill_gemms(&b, 0);
        b.prepare = cu_prepare_fp32;
        b.name = "cuda-fp32";
    }
    return &b;
}

extern "C" const ml_backend *backend_cuda(void) {
    static ml_backend b;
    if (!b.name) {
        init_runtime();
        fill_common(&b);
        ml_cuda_fill_gemms(&b, 1);
        b.prepare = cu_prepare_bf16;
        // tensor-core attention; MOELAB_ATTENTION=fp32 keeps the fp32 kernels (to tell the two apart)
        tc_attention = tc_attention_wanted();
        if (tc_attention) ml_cuda_fill_attention_tc(&b);
        b.bind_params = cu_bind_params;
        b.name = "cuda";
    }
    return &b;
}
