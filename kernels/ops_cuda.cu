// ops_cuda.cu: the CUDA backend's ops other than the GEMMs (gemm_cuda.cu) and attention (attention_cuda.cu),
// with the same contracts as core/cpu/ops_cpu_decl.h, in fp32: embedding, RMSNorm, RoPE, SwiGLU, router
// scores and top-k with selection bias, the routing statistics, the counting-sort dispatch, permute and
// unpermute, cross-entropy, AdamW (which also refreshes the bf16 weight shadow) and the sum of squares.
// Deterministic by construction: no floating-point atomics; every output element has one writer and sums run
// in a fixed order, so the same seed gives the same run.
#include "cuda_common.cuh"

#include <initializer_list>

static unsigned blocks(size_t n, int per = 256) { return ml_blocks(n, per); }
// blocks that each take about 16 of M rows (or tokens), at least 1 and at most cap
static int blocks_of_16(int M, int cap) { return M / 16 < 1 ? 1 : M / 16 > cap ? cap : M / 16; }

// Element-wise ops by rows: a launch over rows x groups of V consecutive floats, threadIdx.x walking a row's groups
// and threadIdx.y the block's rows (a grid-stride loop past 65535 blocks of rows), so no thread divides a 64-bit
// index per element, and narrow rows (RoPE's 12 groups of 4 at head size 96) share warps instead of leaving lanes
// idle; V = 4 (16-byte loads and stores) when every row the op touches starts 16-byte aligned, else 1.
template <int V> struct fvec {
    float v[V];
};
template <int V> __device__ __forceinline__ fvec<V> ldv(const float *p) {
    fvec<V> r;
    if constexpr (V == 4) {
        const float4 f = *(const float4 *)p;
        r.v[0] = f.x, r.v[1] = f.y, r.v[2] = f.z, r.v[3] = f.w;
    } else {
        r.v[0] = *p;
    }
    return r;
}
template <int V> __device__ __forceinline__ void stv(float *p, const fvec<V> &x) {
    if constexpr (V == 4)
        *(float4 *)p = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
    else
        *p = x.v[0];
}
// this thread's first float of its rows (return when past the row's width) and its rows
#define ROW_COLUMN(c, V, width)                                                                                    \
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * (V);                                                  \
    if (c >= (width)) return
#define FOR_ROWS(r, rows)                                                                                          \
    for (size_t r = (size_t)blockIdx.y * blockDim.y + threadIdx.y; r < (size_t)(rows);                            \
         r += (size_t)gridDim.y * blockDim.y)
// whether rows of `width` floats at these bases are all 16-byte aligned
static bool rows16(size_t width, std::initializer_list<const void *> bases) {
    if (width % 4) return false;
    for (const void *p : bases)
        if ((uintptr_t)p % 16) return false;
    return true;
}
// about 256 threads a block: up to 256 groups, the whole row (and as many rows as fit); wider rows split evenly
// over blocks of multiples of 32 (384 groups: 2 x 192, not 256 + 128)
static void row_shape(size_t rows, int groups, dim3 *grid, dim3 *block) {
    if (groups <= 0 || rows == 0) {
        *grid = dim3(0, 0), *block = dim3(1);
        return;
    }
    int gx = groups, ry = 256 / groups, nb = 1;
    if (groups > 256) nb = (groups + 255) / 256, gx = (groups + nb - 1) / nb;
    if (ry <= 1) ry = 1, gx = (gx + 31) / 32 * 32; // a row a block: whole warps
    const size_t yb = (rows + ry - 1) / ry;
    *grid = dim3(nb, (unsigned)(yb < 65535 ? yb : 65535)), *block = dim3(gx, ry);
}
#define ROWS_LAUNCH(op, v4, rows, width, kernel, ...)                                                              \
    do {                                                                                                           \
        dim3 grid_, block_;                                                                                        \
        if (v4) {                                                                                                  \
            row_shape((rows), (int)((width) / 4), &grid_, &block_);                                               \
            LAUNCH_SMEM(op, grid_, block_, 0, kernel<4>, __VA_ARGS__);                                             \
        } else {                                                                                                   \
            row_shape((rows), (int)(width), &grid_, &block_);                                                      \
            LAUNCH_SMEM(op, grid_, block_, 0, kernel<1>, __VA_ARGS__);                                             \
        }                                                                                                          \
    } while (0)

// ---- embedding ----

template <int V> __global__ void k_encoder_forward(float *out, const int32_t *tokens, const float *wte, int M, int C) {
    ROW_COLUMN(c, V, C);
    FOR_ROWS(m, M) stv<V>(out + m * C + c, ldv<V>(wte + (size_t)tokens[m] * C + c));
}
// dwte[tokens[m]] += dout[m] for every m, in m order per element (the CPU's order). A block per share of the
// vocabulary (token ids equal to blockIdx.x modulo gridDim.x; about 16 tokens a share): it walks the tokens 256
// at a time, lists the positions of its share in order (ballot and per-warp counts), then adds those rows, a
// thread per column. Each gradient element has one writer; no thread walks every token serially (the
// per-column loop over all M tokens this replaced took 1.8 ms at 16K tokens on an H100).
#define ENC_THREADS 256
__global__ void __launch_bounds__(ENC_THREADS) k_encoder_backward(float *dwte, const float *dout,
                                                                  const int32_t *tokens, int M, int C) {
    __shared__ int listed[ENC_THREADS], warp_count[ENC_THREADS / 32];
    const int share = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int base = 0; base < M; base += ENC_THREADS) {
        const int m = base + threadIdx.x, mine = m < M && tokens[m] % (int)gridDim.x == share;
        const unsigned ballot = __ballot_sync(0xffffffffu, mine);
        if (lane == 0) warp_count[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < ENC_THREADS / 32; w++) before += w < warp ? warp_count[w] : 0, total += warp_count[w];
        if (mine) listed[before + __popc(ballot & ((1u << lane) - 1))] = m;
        __syncthreads();
        for (int i = 0; i < total; i++) {
            const size_t src = (size_t)listed[i] * C, dst = (size_t)tokens[listed[i]] * C;
            for (int c = threadIdx.x; c < C; c += ENC_THREADS) dwte[dst + c] += dout[src + c];
        }
        __syncthreads(); // the list and counts are refilled next round
    }
}
static void cu_encoder_forward(float *out, const int32_t *tokens, const float *wte, int M, int C) {
    PROF("encoder_forward");
    ROWS_LAUNCH("encoder_forward", rows16(C, {out, wte}), M, C, k_encoder_forward, out, tokens, wte, M, C);
}
static void cu_encoder_backward(float *dwte, const float *dout, const int32_t *tokens, int M, int C) {
    PROF("encoder_backward");
    LAUNCH("encoder_backward", M > 0 ? blocks_of_16(M, 1024) : 0, ENC_THREADS, k_encoder_backward, dwte, dout, tokens,
           M, C);
}

// ---- RMSNorm ----

// a warp per row (rows of C or of one head's hd floats are short): NORM_ROWS rows per block
#define NORM_ROWS 8
__global__ void k_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int M, int C, float eps) {
    const int row = blockIdx.x * NORM_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= M) return; // warp-uniform
    const float *x = inp + (size_t)row * C;
    double ss = 0;
    for (int c = lane; c < C; c += 32) ss += (double)x[c] * x[c];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float r = (float)(1.0 / sqrt(ss / C + eps));
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < C; c += 32) out[(size_t)row * C + c] = x[c] * r * w[c];
}
// backward, one pass over dout and inp: a block per chunk of rows (gridDim.x chunks of 16 rows or more, at most
// ML_NORM_CHUNKS), NORM_ROWS rows at a time. A warp per row sums dot = dout . (w * inp) (double) into shared
// memory; then a thread per column adds dinp += rstd dout w - (dot / C) rstd^3 inp for those rows and sums dw's
// partial for the chunk, dout * inp * rstd, in a shared double per column (the second read of the rows' dout
// and inp hits the cache). Rows narrower than the block (QK-norm's head size) split each column's rows over
// P = blockDim / C threads (P partials per column, added in order at the end), so more than C threads work.
// The chunks' partials are summed afterwards in a fixed order (k_colsum_add). The expressions are those of the
// separate dx and dw kernels this replaced, which read dout and inp twice from memory (24 bytes per element,
// now 16).
// the threads that share a column of the backward's rows: 1 for rows at least as wide as the block
__host__ __device__ inline int norm_split(int C, int threads) {
    const int p = C < threads ? threads / C : 1;
    return p < NORM_ROWS ? p : NORM_ROWS;
}
__global__ void k_rmsnorm_backward(float *dinp, double *part, const float *dout, const float *inp, const float *w,
                                   const float *rstd, int M, int C) {
    ML_DYNAMIC_SMEM(double, dw_part); // P x C partial sums of the chunk
    __shared__ float coef[NORM_ROWS];
    const int ch = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, P = norm_split(C, blockDim.x);
    const int lo = (int)((long long)M * ch / gridDim.x), hi = (int)((long long)M * (ch + 1) / gridDim.x);
    for (int t = threadIdx.x; t < P * C; t += blockDim.x) dw_part[t] = 0;
    for (int r0 = lo; r0 < hi; r0 += NORM_ROWS) {
        const int rows = hi - r0 < NORM_ROWS ? hi - r0 : NORM_ROWS;
        if (warp < rows) { // warp-uniform
            const float *x = inp + (size_t)(r0 + warp) * C, *g = dout + (size_t)(r0 + warp) * C;
            double dot = 0;
            for (int c = lane; c < C; c += 32) dot += (double)g[c] * w[c] * x[c];
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            const float r = rstd[r0 + warp];
            if (lane == 0) coef[warp] = (float)(dot / C) * r * r * r;
        }
        __syncthreads();
        for (int t = threadIdx.x; t < P * C; t += blockDim.x) { // column t % C, rows t / C, t / C + P, ...
            const int c = t % C;
            const float wc = w[c];
            double acc = dw_part[t];
            for (int i = t / C; i < rows; i += P) {
                const size_t o = (size_t)(r0 + i) * C + c;
                const float r = rstd[r0 + i], g = dout[o], x = inp[o];
                dinp[o] += r * g * wc - coef[i] * x;
                acc += (double)g * x * r;
            }
            dw_part[t] = acc;
        }
        __syncthreads(); // coef is refilled next round
    }
    __syncthreads(); // the partials of other threads (a chunk with no rows would skip the loop's barriers)
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double acc = 0;
        for (int p = 0; p < P; p++) acc += dw_part[p * C + c];
        part[(size_t)ch * C + c] = acc;
    }
}
// dw[c] += the sum over the chunks of part[ch][c]: a block per 32 columns, whose 32 rows of threads each sum
// every 32nd chunk, then a fixed tree over those 32 sums (deterministic). The loop this replaced, a thread per
// column over every chunk in turn (1024 dependent latencies), ran on C / 256 blocks: one block at C = 96.
#define COLSUM_LANES 32
__global__ void __launch_bounds__(32 * COLSUM_LANES) k_colsum_add(float *dw, const double *part, int chunks, int C) {
    __shared__ double sum[COLSUM_LANES][32]; // a warp reads and writes along a row
    const int x = threadIdx.x, y = threadIdx.y, c = blockIdx.x * 32 + x;
    double acc = 0;
    if (c < C) {
#pragma unroll 8
        for (int ch = y; ch < chunks; ch += COLSUM_LANES) acc += part[(size_t)ch * C + c];
    }
    sum[y][x] = acc;
    __syncthreads();
    for (int s = COLSUM_LANES / 2; s > 0; s >>= 1) {
        if (y < s) sum[y][x] += sum[y + s][x];
        __syncthreads();
    }
    if (y == 0 && c < C) dw[c] += (float)sum[0][x];
}
static void cu_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int M, int C, float eps) {
    PROF("rmsnorm_forward");
    LAUNCH("rmsnorm_forward", ml_blocks(M, NORM_ROWS), 32 * NORM_ROWS, k_rmsnorm_forward, out, rstd, inp, w, M, C,
           eps);
}
static void cu_rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                const float *rstd, int M, int C) {
    PROF("rmsnorm_backward");
    if (M == 0 || C == 0) return;
    const size_t smem = sizeof(double) * norm_split(C, 32 * NORM_ROWS) * C;
    if (smem > 160 * 1024) ml_cuda_die("rmsnorm_backward", "rows longer than 20480 floats");
    static size_t opted_in = 48 * 1024;
    if (smem > opted_in) {
        CK("rmsnorm_backward", cudaFuncSetAttribute(k_rmsnorm_backward, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    (int)smem));
        opted_in = smem;
    }
    const int chunks = blocks_of_16(M, ML_NORM_CHUNKS);
    double *part = (double *)ml_ws(WS_REDUCE, sizeof(double) * chunks * C);
    LAUNCH_SMEM("rmsnorm_backward", dim3(chunks), 32 * NORM_ROWS, smem, k_rmsnorm_backward, dinp, part, dout, inp, w,
                rstd, M, C);
    LAUNCH("rmsnorm_backward", ml_blocks(C, 32), dim3(32, COLSUM_LANES), k_colsum_add, dw, part, chunks, C);
}

// ---- RoPE ----

// a row per (b, t, head), a group of V rotation pairs (p, p + hd/2) per thread
template <int V>
__global__ void k_rope(float *out, const float *inp, const float *cs, const float *sn, int B, int T, int nh, int hd,
                       int backward) {
    const int half = hd / 2;
    ROW_COLUMN(p, V, half);
    FOR_ROWS(row, (size_t)B * T * nh) {
        const size_t t = row / nh % T; // once per row
        const fvec<V> c = ldv<V>(cs + t * half + p), s = ldv<V>(sn + t * half + p);
        const fvec<V> x1 = ldv<V>(inp + row * hd + p), x2 = ldv<V>(inp + row * hd + p + half);
        float *o = out + row * hd + p;
        fvec<V> o1, o2;
        if (!backward) {
#pragma unroll
            for (int j = 0; j < V; j++)
                o1.v[j] = x1.v[j] * c.v[j] - x2.v[j] * s.v[j], o2.v[j] = x2.v[j] * c.v[j] + x1.v[j] * s.v[j];
        } else {
            o1 = ldv<V>(o), o2 = ldv<V>(o + half);
#pragma unroll
            for (int j = 0; j < V; j++)
                o1.v[j] += x1.v[j] * c.v[j] + x2.v[j] * s.v[j], o2.v[j] += x2.v[j] * c.v[j] - x1.v[j] * s.v[j];
        }
        stv<V>(o, o1), stv<V>(o + half, o2);
    }
}
static void cu_rope_forward(float *out, const float *inp, const float *cs, const float *sn, int B, int T, int nh, int hd) {
    PROF("rope_forward");
    ROWS_LAUNCH("rope_forward", rows16(hd / 2, {out, inp, cs, sn}), (size_t)B * T * nh, hd / 2, k_rope, out, inp, cs,
                sn, B, T, nh, hd, 0);
}
static void cu_rope_backward(float *dinp, const float *dout, const float *cs, const float *sn, int B, int T, int nh,
                             int hd) {
    PROF("rope_backward");
    ROWS_LAUNCH("rope_backward", rows16(hd / 2, {dinp, dout, cs, sn}), (size_t)B * T * nh, hd / 2, k_rope, dinp, dout,
                cs, sn, B, T, nh, hd, 1);
}

// ---- SwiGLU, add ----

// h rows are [gate (F) | up (F)]
template <int V> __global__ void k_swiglu_forward(float *out, const float *h, int M, int F) {
    ROW_COLUMN(f, V, F);
    FOR_ROWS(m, M) {
        const fvec<V> g = ldv<V>(h + m * 2 * F + f), u = ldv<V>(h + m * 2 * F + F + f);
        fvec<V> o;
#pragma unroll
        for (int j = 0; j < V; j++) o.v[j] = g.v[j] / (1 + expf(-g.v[j])) * u.v[j];
        stv<V>(out + m * F + f, o);
    }
}
template <int V> __global__ void k_swiglu_backward(float *dh, const float *dout, const float *h, int M, int F) {
    ROW_COLUMN(f, V, F);
    FOR_ROWS(m, M) {
        const fvec<V> g = ldv<V>(h + m * 2 * F + f), u = ldv<V>(h + m * 2 * F + F + f), d = ldv<V>(dout + m * F + f);
        fvec<V> dg = ldv<V>(dh + m * 2 * F + f), du = ldv<V>(dh + m * 2 * F + F + f);
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float sig = 1 / (1 + expf(-g.v[j]));
            du.v[j] += d.v[j] * g.v[j] * sig;
            dg.v[j] += d.v[j] * u.v[j] * sig * (1 + g.v[j] * (1 - sig));
        }
        stv<V>(dh + m * 2 * F + f, dg), stv<V>(dh + m * 2 * F + F + f, du);
    }
}
// out = a + b: four elements a thread when x4 (all three 16-byte aligned; the n % 4 last one a thread), else one
__global__ void k_add(float *out, const float *a, const float *b, size_t n, int x4) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, n4 = x4 ? n / 4 : 0;
    if (i < n4) {
        const float4 x = ((const float4 *)a)[i], y = ((const float4 *)b)[i];
        ((float4 *)out)[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
    } else if (i - n4 < n - 4 * n4) {
        const size_t e = 4 * n4 + (i - n4);
        out[e] = a[e] + b[e];
    }
}
static void cu_swiglu_forward(float *out, const float *h, int M, int F) {
    PROF("swiglu_forward");
    ROWS_LAUNCH("swiglu_forward", rows16(F, {out, h}), M, F, k_swiglu_forward, out, h, M, F);
}
static void cu_swiglu_backward(float *dh, const float *dout, const float *h, int M, int F) {
    PROF("swiglu_backward");
    ROWS_LAUNCH("swiglu_backward", rows16(F, {dh, dout, h}), M, F, k_swiglu_backward, dh, dout, h, M, F);
}
static void cu_add_forward(float *out, const float *a, const float *b, size_t n) {
    PROF("add_forward");
    const int x4 = rows16(4, {out, a, b});
    LAUNCH("add_forward", blocks(x4 ? n / 4 + n % 4 : n), 256, k_add, out, a, b, n, x4);
}

// ---- router (one thread per token, the CPU's exact rules: ties go to the lower index) ----

#define MAX_E ML_CUDA_MAX_E
__global__ void k_router_forward(float *probs, int32_t *idx, float *gate, const float *logits, const float *bias, int M,
                                 ml_router_params p) {
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const int E = p.E, K = p.k;
    const float *l = logits + (size_t)m * E;
    float *s = probs + (size_t)m * E;
    if (p.score == SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) s[e] = 1 / (1 + expf(-l[e]));
    } else {
        float mx = l[0], sum = 0;
        for (int e = 1; e < E; e++) mx = fmaxf(mx, l[e]);
        for (int e = 0; e < E; e++) sum += (s[e] = expf(l[e] - mx));
        for (int e = 0; e < E; e++) s[e] /= sum;
    }
    int32_t *id = idx + (size_t)m * K;
    for (int j = 0; j < K && !p.given_idx; j++) {
        int best = -1;
        float bv = 0;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= id[i] == e;
            if (taken) continue;
            float kv = s[e] + (bias ? bias[e] : 0);
            if (best < 0 || kv > bv) best = e, bv = kv;
        }
        id[j] = best;
    }
    float *g = gate + (size_t)m * K;
    if (p.softmax_order == SOFTMAX_AFTER_TOPK) {
        float mx = l[id[0]], sum = 0;
        for (int j = 1; j < K; j++) mx = fmaxf(mx, l[id[j]]);
        for (int j = 0; j < K; j++) sum += (g[j] = expf(l[id[j]] - mx));
        for (int j = 0; j < K; j++) g[j] = g[j] / sum * p.route_scale;
    } else {
        float sum = 0;
        for (int j = 0; j < K; j++) sum += (g[j] = s[id[j]]);
        float f = p.norm_topk ? p.route_scale / sum : p.route_scale;
        for (int j = 0; j < K; j++) g[j] *= f;
    }
}
__global__ void k_router_backward(float *dlogits, const float *dgate, const float *dprobs, const float *probs,
                                  const int32_t *idx, const float *gate, int M, ml_router_params p) {
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const int E = p.E, K = p.k;
    const float *s = probs + (size_t)m * E, *g = gate + (size_t)m * K, *dg = dgate + (size_t)m * K;
    const int32_t *id = idx + (size_t)m * K;
    float *dl = dlogits + (size_t)m * E;
    const bool after = p.softmax_order == SOFTMAX_AFTER_TOPK;
    float S = 0, gdot = 0;
    if (after) {
        float dot = 0;
        for (int j = 0; j < K; j++) dot += g[j] * dg[j];
        dot /= p.route_scale;
        for (int j = 0; j < K; j++) dl[id[j]] += g[j] * (dg[j] - dot);
    } else if (p.norm_topk) {
        for (int j = 0; j < K; j++) S += s[id[j]], gdot += g[j] * dg[j];
    }
    // the score gradient of expert e, recomputed where needed instead of kept in an E-long local array: the
    // policies' dprobs, then the gates' terms in choice order (the CPU's order of additions)
    auto ds_of = [&](int e) {
        float d = dprobs ? dprobs[(size_t)m * E + e] : 0;
        if (!after)
            for (int j = 0; j < K; j++)
                if (id[j] == e) d += p.norm_topk ? (p.route_scale * dg[j] - gdot) / S : p.route_scale * dg[j];
        return d;
    };
    if (p.score == SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) dl[e] += ds_of(e) * s[e] * (1 - s[e]);
    } else {
        float dot = 0;
        for (int e = 0; e < E; e++) dot += s[e] * ds_of(e);
        for (int e = 0; e < E; e++) dl[e] += s[e] * (ds_of(e) - dot);
    }
}
static void cu_router_forward(float *probs, int32_t *idx, float *gate, const float *logits, const float *bias, int M,
                              const ml_router_params *p) {
    PROF("router_forward");
    if (p->E > MAX_E) ml_cuda_die("router_forward", "more than 1024 experts");
    LAUNCH("router_forward", blocks(M, 128), 128, k_router_forward, probs, idx, gate, logits, bias, M, *p);
}
static void cu_router_backward(float *dlogits, const float *dgate, const float *dprobs, const float *logits,
                               const float *probs, const int32_t *idx, const float *gate, int M,
                               const ml_router_params *p) {
    PROF("router_backward");
    (void)logits;
    LAUNCH("router_backward", blocks(M, 128), 128, k_router_backward, dlogits, dgate, dprobs, probs, idx, gate, M, *p);
}

// ---- routing statistics: row sums, per-chunk column partials, then the partials in chunk order. Chunks of
// STAT_ROWS rows never straddle a segment (cps chunks per segment), so each segment sums its own chunks. ----

#define STAT_ROWS 128
__global__ void k_row_sums(double *rs, const float *probs, int M, int E) {
    int m = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (m >= M) return;
    double acc = 0;
    for (int e = lane; e < E; e += 32) acc += probs[(size_t)m * E + e];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) rs[m] = acc;
}
__global__ void k_route_stats_part(double *psum_part, int32_t *sel_part, const float *probs, const double *rs,
                                   const int32_t *idx, int seg, int cps, int k, int E) {
    const int ch = blockIdx.x, b = ch / cps, lo = b * seg + (ch % cps) * STAT_ROWS;
    const int hi = min((b + 1) * seg, lo + STAT_ROWS);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        double acc = 0;
        int cnt = 0;
        for (int m = lo; m < hi; m++) {
            acc += probs[(size_t)m * E + e] / rs[m];
            for (int j = 0; j < k; j++) cnt += idx[(size_t)m * k + j] == e;
        }
        psum_part[(size_t)ch * E + e] = acc;
        sel_part[(size_t)ch * E + e] = cnt;
    }
}
// out[b, e] = the sum of segment b's cps chunk partials of column e (nseg x E outputs)
__global__ void k_chunk_sums(double *psum, int32_t *selected, const double *psum_part, const int32_t *sel_part,
                             int cps, int nseg, int E) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nseg * E) return;
    const int b = i / E, e = i % E;
    double acc = 0;
    int cnt = 0;
    for (int ch = b * cps; ch < (b + 1) * cps; ch++) {
        acc += psum_part[(size_t)ch * E + e];
        if (selected) cnt += sel_part[(size_t)ch * E + e];
    }
    psum[i] = acc;
    if (selected) selected[i] = cnt;
}
static void cu_route_stats(double *psum, int32_t *selected, const float *probs, const int32_t *idx, int M, int k,
                           int E, int seg) {
    PROF("route_stats");
    if (M == 0 || seg <= 0) return;
    const int nseg = M / seg, cps = (seg + STAT_ROWS - 1) / STAT_ROWS, chunks = nseg * cps;
    char *w = (char *)ml_ws(WS_REDUCE, sizeof(double) * M + (sizeof(double) + sizeof(int32_t)) * (size_t)chunks * E);
    double *rs = (double *)w, *pp = rs + M;
    int32_t *sp = (int32_t *)(pp + (size_t)chunks * E);
    LAUNCH("route_stats", blocks(M, 8), 256, k_row_sums, rs, probs, M, E);
    LAUNCH("route_stats", chunks, 128, k_route_stats_part, pp, sp, probs, rs, idx, seg, cps, k, E);
    LAUNCH("route_stats", blocks(nseg * E, 128), 128, k_chunk_sums, psum, selected, pp, sp, cps, nseg, E);
}

// ---- the lbl losses' gradient (backend.h lbl_backward): one warp per token row, double sums ----

__global__ void k_lbl_backward(float *dprobs, const float *probs, const float *g, float scale, int M, int E,
                               int seg) {
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= M) return;
    const float *s = probs + (size_t)t * E, *gb = g + (size_t)(t / seg) * E;
    float *d = dprobs + (size_t)t * E;
    double sum = 0, dot = 0;
    for (int e = lane; e < E; e += 32) sum += s[e], dot += (double)gb[e] * s[e];
    for (int o = 16; o > 0; o >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, o), dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const double inv = 1.0 / sum, c = scale * inv;
    dot *= inv;
    for (int e = lane; e < E; e += 32) d[e] += (float)(c * (gb[e] - dot));
}
static void cu_lbl_backward(float *dprobs, const float *probs, const float *g, float scale, int M, int E, int seg) {
    PROF("lbl_backward");
    LAUNCH("lbl_backward", blocks(M, 8), 256, k_lbl_backward, dprobs, probs, g, scale, M, E, seg);
}

// ---- the z-loss and the tempered (top1_loss) statistics and gradients: a warp per token row; sums over rows
// in chunks of STAT_ROWS (a block each) added in chunk order, as route_stats ----

// logsumexp of the row l / tau (every lane gets it)
__device__ double warp_row_lse(const float *l, int E, double inv_tau) {
    float mx = -INFINITY;
    for (int e = threadIdx.x % 32; e < E; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    double sum = 0;
    for (int e = threadIdx.x % 32; e < E; e += 32) sum += exp(((double)l[e] - mx) * inv_tau);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    return (double)mx * inv_tau + log(sum);
}
#define ROW_WARPS 8 // 256-thread blocks: 8 warps share a chunk's rows
__global__ void k_zloss_part(double *part, const float *logits, int M, int E) {
    __shared__ double warp_acc[ROW_WARPS];
    const int warp = threadIdx.x / 32, lo = blockIdx.x * STAT_ROWS, hi = min(M, lo + STAT_ROWS);
    double acc = 0;
    for (int t = lo + warp; t < hi; t += ROW_WARPS) {
        const double lse = warp_row_lse(logits + (size_t)t * E, E, 1.0);
        acc += lse * lse;
    }
    if (threadIdx.x % 32 == 0) warp_acc[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0;
        for (int w = 0; w < ROW_WARPS; w++) s += warp_acc[w];
        part[blockIdx.x] = s;
    }
}
static void cu_zloss_forward(double *zsum, const float *logits, int M, int E) {
    PROF("zloss_forward");
    const int chunks = (M + STAT_ROWS - 1) / STAT_ROWS;
    if (chunks == 0) {
        CK("zloss_forward", cudaMemsetAsync(zsum, 0, sizeof(double)));
        return;
    }
    double *pp = (double *)ml_ws(WS_REDUCE, sizeof(double) * chunks);
    LAUNCH("zloss_forward", chunks, 32 * ROW_WARPS, k_zloss_part, pp, logits, M, E);
    LAUNCH("zloss_forward", 1, 32, k_chunk_sums, zsum, (int32_t *)NULL, pp, (const int32_t *)NULL, chunks, 1, 1);
}
__global__ void k_zloss_backward(float *dlogits, const float *logits, float scale, int M, int E) {
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (t >= M) return;
    const float *l = logits + (size_t)t * E;
    const double lse = warp_row_lse(l, E, 1.0);
    float *d = dlogits + (size_t)t * E;
    for (int e = threadIdx.x % 32; e < E; e += 32) d[e] += (float)(scale * lse * exp(l[e] - lse));
}
static void cu_zloss_backward(float *dlogits, const float *logits, float scale, int M, int E) {
    PROF("zloss_backward");
    LAUNCH("zloss_backward", blocks(M, 8), 256, k_zloss_backward, dlogits, logits, scale, M, E);
}

// per chunk: the rows' lse (a warp each) and chosen-score sums into shared memory, then a thread per expert
// sums p_te over the chunk's rows; part = chunks x (E + 1): E columns, then the chosen scores
__global__ void k_tempered_part(double *part, const float *logits, const float *probs, const int32_t *idx,
                                double inv_tau, int M, int k, int E) {
    __shared__ double lse[STAT_ROWS], chosen[STAT_ROWS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, lo = blockIdx.x * STAT_ROWS;
    const int rows = min(M - lo, STAT_ROWS);
    for (int r = warp; r < rows; r += ROW_WARPS) {
        const int t = lo + r;
        const double v = warp_row_lse(logits + (size_t)t * E, E, inv_tau);
        if (lane == 0) {
            double s = 0;
            for (int j = 0; j < k; j++) {
                const int32_t e = idx[(size_t)t * k + j];
                if (e >= 0) s += probs[(size_t)t * E + e];
            }
            lse[r] = v, chosen[r] = s;
        }
    }
    __syncthreads();
    double *out = part + (size_t)blockIdx.x * (E + 1);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        double acc = 0;
        for (int r = 0; r < rows; r++) acc += exp((double)logits[(size_t)(lo + r) * E + e] * inv_tau - lse[r]);
        out[e] = acc;
    }
    if (threadIdx.x == 0) {
        double s = 0;
        for (int r = 0; r < rows; r++) s += chosen[r];
        out[E] = s;
    }
}
// the chunks' partials in chunk order: fsum (E), then ssum from the last column
__global__ void k_tempered_sum(double *fsum, double *ssum, const double *part, int chunks, int E) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i > E) return;
    double acc = 0;
    for (int ch = 0; ch < chunks; ch++) acc += part[(size_t)ch * (E + 1) + i];
    if (i < E) fsum[i] = acc;
    else *ssum = acc;
}
static void cu_tempered_forward(double *fsum, double *ssum, const float *logits, const float *probs,
                                const int32_t *idx, float tau, int M, int k, int E) {
    PROF("tempered_forward");
    const int chunks = (M + STAT_ROWS - 1) / STAT_ROWS;
    if (chunks == 0) {
        CK("tempered_forward", cudaMemsetAsync(fsum, 0, sizeof(double) * E));
        CK("tempered_forward", cudaMemsetAsync(ssum, 0, sizeof(double)));
        return;
    }
    double *pp = (double *)ml_ws(WS_REDUCE, sizeof(double) * chunks * (E + 1));
    LAUNCH("tempered_forward", chunks, 32 * ROW_WARPS, k_tempered_part, pp, logits, probs, idx, 1.0 / tau, M, k, E);
    LAUNCH("tempered_forward", blocks(E + 1, 128), 128, k_tempered_sum, fsum, ssum, pp, chunks, E);
}
__global__ void k_tempered_backward(float *dlogits, float *dprobs, const float *logits, const int32_t *idx,
                                    const float *c, float cscale, float a, double inv_tau, int M, int k, int E) {
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= M) return;
    const float *l = logits + (size_t)t * E;
    const double lse = warp_row_lse(l, E, inv_tau);
    double dot = 0;
    for (int e = lane; e < E; e += 32) dot += exp((double)l[e] * inv_tau - lse) * c[e];
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    float *d = dlogits + (size_t)t * E;
    for (int e = lane; e < E; e += 32)
        d[e] += (float)(cscale * exp((double)l[e] * inv_tau - lse) * (c[e] - dot) * inv_tau);
    if (lane == 0) // one lane: a row that names an expert twice (forced round-robin, k > E) adds a twice
        for (int j = 0; j < k; j++) {
            const int32_t e = idx[(size_t)t * k + j];
            if (e >= 0) dprobs[(size_t)t * E + e] += a;
        }
}
static void cu_tempered_backward(float *dlogits, float *dprobs, const float *logits, const int32_t *idx,
                                 const float *c, float cscale, float a, float tau, int M, int k, int E) {
    PROF("tempered_backward");
    LAUNCH("tempered_backward", blocks(M, 8), 256, k_tempered_backward, dlogits, dprobs, logits, idx, c, cscale, a,
           1.0 / tau, M, k, E);
}

// ---- dispatch: a stable counting sort of the M k choices by expert, in chunks of 256 choices. Within a warp
// the lanes that chose the same expert find each other (__match_any_sync) and rank by lane; warps rank by
// warp, chunks by chunk: slot = offsets[e] + earlier chunks' e + earlier warps' e + earlier lanes' e. ----

#define DISPATCH_CHUNK 256
// the per-warp histogram of this chunk in sh (8 x E, zeroed here); returns this thread's rank in its warp
__device__ int chunk_warp_histogram(int32_t *sh, const int32_t *idx, int n, int E, int *my_e) {
    const int i = blockIdx.x * DISPATCH_CHUNK + threadIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int j = threadIdx.x; j < 8 * E; j += blockDim.x) sh[j] = 0;
    __syncthreads();
    int e = i < n ? idx[i] : -1;
    unsigned peers = __match_any_sync(0xffffffffu, e);
    int rank = __popc(peers & ((1u << lane) - 1));
    if (e >= 0 && rank == 0) sh[warp * E + e] = __popc(peers);
    __syncthreads();
    *my_e = e;
    return rank;
}
__global__ void k_dispatch_count(int32_t *chunk_counts, const int32_t *idx, int n, int E) {
    ML_DYNAMIC_SMEM(int32_t, sh);
    int e;
    chunk_warp_histogram(sh, idx, n, E, &e);
    for (int x = threadIdx.x; x < E; x += blockDim.x) {
        int c = 0;
        for (int w = 0; w < 8; w++) c += sh[w * E + x];
        chunk_counts[(size_t)blockIdx.x * E + x] = c;
    }
}
// one block: counts, offsets, and each chunk's base per expert (in place of its counts)
__global__ void k_dispatch_scan(int32_t *counts, int32_t *offsets, int32_t *chunk_base, int chunks, int E) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int c = 0;
        for (int ch = 0; ch < chunks; ch++) {
            int x = chunk_base[(size_t)ch * E + e];
            chunk_base[(size_t)ch * E + e] = c;
            c += x;
        }
        counts[e] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        offsets[0] = 0;
        for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        for (int ch = 0; ch < chunks; ch++) chunk_base[(size_t)ch * E + e] += offsets[e];
}
__global__ void k_dispatch_slots(int32_t *slot, const int32_t *chunk_base, const int32_t *idx, int n, int E) {
    ML_DYNAMIC_SMEM(int32_t, sh);
    int e, rank = chunk_warp_histogram(sh, idx, n, E, &e);
    const int i = blockIdx.x * DISPATCH_CHUNK + threadIdx.x, warp = threadIdx.x / 32;
    if (i >= n) return;
    if (e < 0) {
        slot[i] = -1;
        return;
    }
    int before = 0;
    for (int w = 0; w < warp; w++) before += sh[w * E + e];
    slot[i] = chunk_base[(size_t)blockIdx.x * E + e] + before + rank;
}
static void cu_moe_dispatch(int32_t *counts, int32_t *offsets, int32_t *slot, const int32_t *idx, int M, int k, int E) {
    PROF("moe_dispatch");
    if (E > ML_CUDA_MAX_E) ml_cuda_die("moe_dispatch", "more than 1024 experts");
    const int n = M * k, chunks = (n + DISPATCH_CHUNK - 1) / DISPATCH_CHUNK;
    int32_t *chunk = (int32_t *)ml_ws(WS_DISPATCH, sizeof(int32_t) * (size_t)(chunks ? chunks : 1) * E);
    const size_t smem = sizeof(int32_t) * 8 * E;
    if (smem > 48 * 1024) ml_cuda_die("moe_dispatch", "too many experts for the shared-memory histogram");
    dim3 grid(chunks);
    LAUNCH_SMEM("moe_dispatch", grid, DISPATCH_CHUNK, smem, k_dispatch_count, chunk, idx, n, E);
    LAUNCH("moe_dispatch", 1, 1024, k_dispatch_scan, counts, offsets, chunk, chunks, E);
    LAUNCH_SMEM("moe_dispatch", grid, DISPATCH_CHUNK, smem, k_dispatch_slots, slot, chunk, idx, n, E);
    ml_offsets_publish(offsets, E);
}

// ---- capacity drops (backend.h capacity_route) on a dispatch of idx: by position a choice's rank is its slot's
// place in its expert's range; by score, a thread per choice counts the choices of its expert that come first
// (higher score, or the same score and an earlier position), through perm (slot -> choice) ----

__global__ void k_capacity_perm(int32_t *perm, const int32_t *idx, const int32_t *slot, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && idx[i] >= 0) perm[slot[i]] = i;
}
__global__ void k_capacity_route(int32_t *route, const int32_t *idx, const float *probs, const int32_t *offsets,
                                 const int32_t *slot, const int32_t *perm, int cap, int by_score, int n, int k,
                                 int E) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int e = idx[i];
    if (e < 0) {
        route[i] = -1;
        return;
    }
    const int lo = offsets[e], hi = offsets[e + 1];
    int rank = slot[i] - lo;
    if (by_score && hi - lo > cap) {
        const float si = probs[(size_t)(i / k) * E + e];
        rank = 0;
        for (int r = lo; r < hi && rank < cap; r++) {
            const int j = perm[r];
            const float sj = probs[(size_t)(j / k) * E + e];
            rank += sj > si || (sj == si && j < i);
        }
    }
    route[i] = rank < cap ? e : -1;
}
static void cu_capacity_route(int32_t *route, const int32_t *idx, const float *probs, const int32_t *offsets,
                              const int32_t *slot, int cap, int by_score, int M, int k, int E) {
    PROF("capacity_route");
    const int n = M * k;
    int32_t *perm = by_score ? (int32_t *)ml_ws(WS_CAPACITY, sizeof(int32_t) * (size_t)(n ? n : 1)) : NULL;
    if (by_score) LAUNCH("capacity_route", blocks(n, 256), 256, k_capacity_perm, perm, idx, slot, n);
    LAUNCH("capacity_route", blocks(n, 256), 256, k_capacity_route, route, idx, probs, offsets, slot, perm, cap,
           by_score, n, k, E);
}

// ---- permute / unpermute ----

// rows of C floats: xe's row slot[m k + j] is inp's row m (choices dropped: slot -1)
template <int V>
__global__ void k_permute_forward(float *xe, const float *inp, const int32_t *slot, int M, int k, int C) {
    ROW_COLUMN(c, V, C);
    FOR_ROWS(mj, (size_t)M * k) {
        const int r = slot[mj];
        if (r >= 0) stv<V>(xe + (size_t)r * C + c, ldv<V>(inp + mj / k * C + c));
    }
}
template <int V>
__global__ void k_permute_backward(float *dinp, const float *dxe, const int32_t *slot, int M, int k, int C) {
    ROW_COLUMN(c, V, C);
    FOR_ROWS(m, M) {
        fvec<V> acc{};
        for (int j = 0; j < k; j++) {
            const int r = slot[m * k + j];
            if (r < 0) continue;
            const fvec<V> x = ldv<V>(dxe + (size_t)r * C + c);
#pragma unroll
            for (int i = 0; i < V; i++) acc.v[i] += x.v[i];
        }
        fvec<V> d = ldv<V>(dinp + m * C + c);
#pragma unroll
        for (int i = 0; i < V; i++) d.v[i] += acc.v[i];
        stv<V>(dinp + m * C + c, d);
    }
}
template <int V>
__global__ void k_unpermute_forward(float *out, const float *ye, const float *gate, const int32_t *slot, int M, int k,
                                    int C) {
    ROW_COLUMN(c, V, C);
    FOR_ROWS(m, M) {
        fvec<V> acc = ldv<V>(out + m * C + c);
        for (int j = 0; j < k; j++) {
            const int r = slot[m * k + j];
            if (r < 0) continue;
            const float gj = gate[m * k + j];
            const fvec<V> y = ldv<V>(ye + (size_t)r * C + c);
#pragma unroll
            for (int i = 0; i < V; i++) acc.v[i] += gj * y.v[i];
        }
        stv<V>(out + m * C + c, acc);
    }
}
template <int V>
__global__ void k_unpermute_backward_dye(float *dye, const float *dout, const float *gate, const int32_t *slot, int M,
                                         int k, int C) {
    ROW_COLUMN(c, V, C);
    FOR_ROWS(mj, (size_t)M * k) {
        const int r = slot[mj];
        if (r < 0) continue;
        const float gj = gate[mj];
        const fvec<V> d = ldv<V>(dout + mj / k * C + c);
        fvec<V> y = ldv<V>(dye + (size_t)r * C + c);
#pragma unroll
        for (int i = 0; i < V; i++) y.v[i] += gj * d.v[i];
        stv<V>(dye + (size_t)r * C + c, y);
    }
}
__global__ void k_unpermute_backward_dgate(float *dgate, const float *dout, const float *ye, const int32_t *slot, int M,
                                           int k, int C) {
    __shared__ float sh[RBLOCK];
    size_t mj = blockIdx.x;
    int r = slot[mj];
    float dot = 0;
    if (r >= 0)
        for (int c = threadIdx.x; c < C; c += blockDim.x) dot += dout[(mj / k) * C + c] * ye[(size_t)r * C + c];
    dot = block_sum(dot, sh);
    if (threadIdx.x == 0 && r >= 0) dgate[mj] += dot;
}
static void cu_permute_forward(float *xe, const float *inp, const int32_t *slot, int M, int k, int C) {
    PROF("permute_forward");
    ROWS_LAUNCH("permute_forward", rows16(C, {xe, inp}), (size_t)M * k, C, k_permute_forward, xe, inp, slot, M, k, C);
}
static void cu_permute_backward(float *dinp, const float *dxe, const int32_t *slot, int M, int k, int C) {
    PROF("permute_backward");
    ROWS_LAUNCH("permute_backward", rows16(C, {dinp, dxe}), M, C, k_permute_backward, dinp, dxe, slot, M, k, C);
}
static void cu_unpermute_forward(float *out, const float *ye, const float *gate, const int32_t *slot, int M, int k,
                                 int C) {
    PROF("unpermute_forward");
    ROWS_LAUNCH("unpermute_forward", rows16(C, {out, ye}), M, C, k_unpermute_forward, out, ye, gate, slot, M, k, C);
}
static void cu_unpermute_backward(float *dye, float *dgate, const float *dout, const float *ye, const float *gate,
                                  const int32_t *slot, int M, int k, int C) {
    PROF("unpermute_backward");
    ROWS_LAUNCH("unpermute_backward", rows16(C, {dye, dout}), (size_t)M * k, C, k_unpermute_backward_dye, dye, dout,
                gate, slot, M, k, C);
    LAUNCH("unpermute_backward", M * k, RBLOCK, k_unpermute_backward_dgate, dgate, dout, ye, slot, M, k, C);
}

// ---- cross-entropy (one block per row) ----

// one element of a row into this thread's running (max m, sum s of exp(x - m), in double as the CPU's forward
// sums): the sum is rescaled when the maximum grows, so the row is read once for both (-inf logits add nothing)
__device__ __forceinline__ void online_add(float &m, double &s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1, m = x; // expf(-inf) = 0 for the first element
    } else if (x != -INFINITY) {
        s += expf(x - m);
    }
}
// the row's maximum and sum of exp(l - max), combined over the block in a fixed order; rows of V4 groups of
// four floats (16-byte aligned) or single floats
template <int V4> __device__ void row_stats(const float *l, int V, float *shf, double *shd, float *mx, double *sum) {
    float m = -INFINITY;
    double s = 0;
    if (V4) {
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            const float4 x = ((const float4 *)l)[i];
            online_add(m, s, x.x), online_add(m, s, x.y), online_add(m, s, x.z), online_add(m, s, x.w);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) online_add(m, s, l[i]);
    }
    *mx = block_max(m, shf);
    *sum = block_sum(m == -INFINITY ? 0.0 : s * expf(m - *mx), shd);
}
template <int V4>
__global__ void k_crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int V) {
    __shared__ float shf[RBLOCK];
    __shared__ double shd[RBLOCK];
    const float *l = logits + (size_t)blockIdx.x * V;
    float mx;
    double sum;
    row_stats<V4>(l, V, shf, shd, &mx, &sum);
    if (threadIdx.x == 0) losses[blockIdx.x] = (float)(log(sum) + mx - l[targets[blockIdx.x]]);
}
// dlogits += scale (softmax(l) - onehot(target)): the statistics in one read of the row, then one pass that
// reads it again and adds into dlogits
template <int V4>
__global__ void k_crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets, float scale, int V) {
    __shared__ float shf[RBLOCK];
    __shared__ double shd[RBLOCK];
    const float *l = logits + (size_t)blockIdx.x * V;
    float *d = dlogits + (size_t)blockIdx.x * V;
    float mx;
    double sum;
    row_stats<V4>(l, V, shf, shd, &mx, &sum);
    const float inv = (float)(scale / sum);
    const int tgt = targets[blockIdx.x];
    if (V4) {
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            const float4 x = ((const float4 *)l)[i];
            float4 g = ((float4 *)d)[i];
            g.x += expf(x.x - mx) * inv, g.y += expf(x.y - mx) * inv, g.z += expf(x.z - mx) * inv;
            g.w += expf(x.w - mx) * inv;
            if (tgt / 4 == i) { // the target's thread subtracts: one writer per element
                const int r = tgt % 4;
                g.x -= r == 0 ? scale : 0.f, g.y -= r == 1 ? scale : 0.f, g.z -= r == 2 ? scale : 0.f;
                g.w -= r == 3 ? scale : 0.f;
            }
            ((float4 *)d)[i] = g;
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            d[i] += expf(l[i] - mx) * inv;
            if (i == tgt) d[i] -= scale;
        }
    }
}
static void cu_crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int M, int V) {
    PROF("crossentropy_forward");
    if (rows16(V, {logits}))
        LAUNCH("crossentropy_forward", M, RBLOCK, k_crossentropy_forward<1>, losses, logits, targets, V);
    else
        LAUNCH("crossentropy_forward", M, RBLOCK, k_crossentropy_forward<0>, losses, logits, targets, V);
}
static void cu_crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets, float scale, int M,
                                     int V) {
    PROF("crossentropy_backward");
    if (rows16(V, {logits, dlogits}))
        LAUNCH("crossentropy_backward", M, RBLOCK, k_crossentropy_backward<1>, dlogits, logits, targets, scale, V);
    else
        LAUNCH("crossentropy_backward", M, RBLOCK, k_crossentropy_backward<0>, dlogits, logits, targets, scale, V);
}

// ---- AdamW, sum of squares ----

// AdamW on the fp32 master weights; when they are shadowed in bf16 (the "cuda" table) the shadow is written
// in the same pass, so the next step's GEMMs see the new weights. Memory-bound (about 30 bytes a parameter):
// four elements a thread with 16-byte loads where the arrays allow it.
struct adamw_args {
    float lr, beta1, beta2, eps, wd, grad_scale, c1, c2;
};
__device__ __forceinline__ void adamw_one(float &p, float g, float &m, float &v, const adamw_args &a) {
    g *= a.grad_scale;
    m = a.beta1 * m + (1 - a.beta1) * g;
    v = a.beta2 * v + (1 - a.beta2) * g * g;
    const float mh = m * a.c1, vh = v * a.c2;
    p = p - a.lr * (mh / (sqrtf(vh) + a.eps) + a.wd * p);
}
// elements [head, head + 4 body) four a thread (16-byte aligned there), then the first head and the last
// (n - head) % 4 elements one a thread
__global__ void k_adamw(float *param, bf16 *shadow, const float *grad, float *m, float *v, size_t n, size_t head,
                        adamw_args a) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, body = (n - head) / 4;
    if (i < body) {
        const size_t e = head + 4 * i;
        float4 p = *(float4 *)&param[e], mm = *(float4 *)&m[e], vv = *(float4 *)&v[e];
        const float4 g = *(const float4 *)&grad[e];
        adamw_one(p.x, g.x, mm.x, vv.x, a), adamw_one(p.y, g.y, mm.y, vv.y, a);
        adamw_one(p.z, g.z, mm.z, vv.z, a), adamw_one(p.w, g.w, mm.w, vv.w, a);
        *(float4 *)&param[e] = p, *(float4 *)&m[e] = mm, *(float4 *)&v[e] = vv;
        if (shadow) *(uint2 *)&shadow[e] = make_uint2(ml_bf16x2(p.x, p.y), ml_bf16x2(p.z, p.w));
        return;
    }
    const size_t j = i - body;
    if (j >= head + (n - head) % 4) return;
    const size_t e = j < head ? j : head + 4 * body + (j - head);
    float p = param[e], mm = m[e], vv = v[e];
    adamw_one(p, grad[e], mm, vv, a);
    param[e] = p, m[e] = mm, v[e] = vv;
    if (shadow) shadow[e] = __float2bfloat16_rn(p);
}
static void cu_adamw_update(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                            float beta2, float eps, float weight_decay, float grad_scale, int t) {
    PROF("adamw_update");
    ml_deferred_zero_complete("adamw_update", grad, sizeof(float) * n);
    const adamw_args a = {lr, beta1, beta2, eps, weight_decay, grad_scale, (float)(1.0 / (1.0 - pow(beta1, t))),
                          (float)(1.0 / (1.0 - pow(beta2, t)))};
    bf16 *shadow = ml_shadow_range(param, n);
    // the vector body needs the four fp32 arrays at the same offset within 16 bytes (and the shadow within 8)
    const uintptr_t mis = (uintptr_t)param % 16;
    const bool same = (uintptr_t)grad % 16 == mis && (uintptr_t)m % 16 == mis && (uintptr_t)v % 16 == mis &&
                      mis % 4 == 0 && (!shadow || (uintptr_t)shadow % 8 == mis / 2);
    const size_t head = same ? ((16 - mis) % 16 / 4 < n ? (16 - mis) % 16 / 4 : n) : n;
    const size_t threads = (n - head) / 4 + head + (n - head) % 4;
    LAUNCH("adamw_update", blocks(threads), 256, k_adamw, param, shadow, grad, m, v, n, head, a);
}

#define SUMSQ_BLOCKS 1024 // enough blocks in flight to stream the gradients at memory speed
// part[b] = the sum of squares of block b's share; 16-byte loads where x allows (unrolled: several in flight)
__global__ void k_sumsq(double *part, const float *x, size_t n) {
    __shared__ double sh[RBLOCK];
    const size_t lo = n * blockIdx.x / SUMSQ_BLOCKS, hi = n * (blockIdx.x + 1) / SUMSQ_BLOCKS, bd = blockDim.x;
    double acc[4] = {0, 0, 0, 0};
    size_t a = lo;
    while (a < hi && ((uintptr_t)(x + a) & 15)) a++; // [lo, a) and the tail element-wise, below
    const size_t n4 = (hi - a) / 4;
    const float4 *x4 = (const float4 *)(x + a);
#pragma unroll 4
    for (size_t i = threadIdx.x; i < n4; i += bd) {
        const float4 f = x4[i];
        acc[0] += (double)f.x * f.x, acc[1] += (double)f.y * f.y, acc[2] += (double)f.z * f.z, acc[3] += (double)f.w * f.w;
    }
    for (size_t i = lo + threadIdx.x; i < a; i += bd) acc[0] += (double)x[i] * x[i];
    for (size_t i = a + 4 * n4 + threadIdx.x; i < hi; i += bd) acc[0] += (double)x[i] * x[i];
    const double s = block_sum((acc[0] + acc[1]) + (acc[2] + acc[3]), sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
static double *sumsq_part; // allocated with the table
static double cu_sumsq(const float *x, size_t n) {
    PROF("sumsq");
    ml_deferred_zero_complete("sumsq", x, sizeof(float) * n);
    LAUNCH("sumsq", SUMSQ_BLOCKS, RBLOCK, k_sumsq, sumsq_part, x, n);
    double h[SUMSQ_BLOCKS], total = 0;
    CK("sumsq", cudaMemcpy(h, sumsq_part, sizeof h, cudaMemcpyDeviceToHost));
    for (int i = 0; i < SUMSQ_BLOCKS; i++) total += h[i];
    return total;
}

// ---- the table ----

size_t ml_ops_fixed_bytes(void) { return sizeof(double) * SUMSQ_BLOCKS; }

void ml_cuda_fill_ops(ml_backend *b) {
    if (!sumsq_part) CK("sumsq", cudaMalloc(&sumsq_part, ml_ops_fixed_bytes()));
    b->encoder_forward = cu_encoder_forward, b->encoder_backward = cu_encoder_backward;
    b->rmsnorm_forward = cu_rmsnorm_forward, b->rmsnorm_backward = cu_rmsnorm_backward;
    b->rope_forward = cu_rope_forward, b->rope_backward = cu_rope_backward;
    b->swiglu_forward = cu_swiglu_forward, b->swiglu_backward = cu_swiglu_backward;
    b->add_forward = cu_add_forward;
    b->router_forward = cu_router_forward, b->router_backward = cu_router_backward;
    b->route_stats = cu_route_stats;
    b->lbl_backward = cu_lbl_backward;
    b->zloss_forward = cu_zloss_forward, b->zloss_backward = cu_zloss_backward;
    b->tempered_forward = cu_tempered_forward, b->tempered_backward = cu_tempered_backward;
    b->capacity_route = cu_capacity_route;
    b->moe_dispatch = cu_moe_dispatch;
    b->permute_forward = cu_permute_forward, b->permute_backward = cu_permute_backward;
    b->unpermute_forward = cu_unpermute_forward, b->unpermute_backward = cu_unpermute_backward;
    b->crossentropy_forward = cu_crossentropy_forward, b->crossentropy_backward = cu_crossentropy_backward;
    b->adamw_update = cu_adamw_update;
    b->sumsq = cu_sumsq;
}
