// test_expert_gemm_emu.cpp: moelab's own expert GEMM kernels on the host under tests/emu/cuda_emu.h, against a
// double-precision reference: kernels/expert_wgrad.cu (weight gradients, the cuda table's default) and
// kernels/expert_matmul.cu (forward and input gradient, opt-in). Shapes with partial tiles (rows and columns past
// a 128-wide tile, a reduction that ends inside a 32-deep stage) and experts of 0 to 300 rows, onto outputs that
// already hold values (the forward must overwrite its rows), from an output offset by one float (the unpaired
// stores). Inputs are bf16 values, so each product is exact in fp32: the bound is fp32 summation's. Under five
// thread orders and cp.async copies completing as early and as late as the hardware may, every run must give the
// same bits (a stage read before its wait, or refilled while a warp still reads it, shows); what the kernel must
// not touch (empty experts' gradients, the floats around the output) must stay as it was. The weight gradients
// once more with the hot experts (many rows) handed to cublasGemmEx beside the kernel.
#include <vector>

#include "check.h"
#include "cuda_emu.h"
#include "emu_hash.h"

void ml_expert_wgrad(const char *op, float *dw, const __nv_bfloat16 *dout, const __nv_bfloat16 *inp,
                     const int32_t *offsets, const int32_t *offsets_host, int E, int N, int K,
                     int fresh); // expert_wgrad.cu
extern int ml_expert_wgrad_hot_rows; // experts with this many rows or more: one cublasGemmEx each
void ml_expert_matmul(const char *op, int dinp, float *out, const __nv_bfloat16 *a, const __nv_bfloat16 *w,
                      const int32_t *offsets, const int32_t *offsets_host, int32_t *tile_start, int E, int N,
                      int K); // expert_matmul.cu

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rnd() {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return 2.0f * (float)(rng_state >> 40) / (float)(1 << 24) - 1.0f;
}
template <class T> static T *upload(const std::vector<T> &h) {
    T *d;
    cudaMalloc(&d, sizeof(T) * h.size());
    cudaMemcpy(d, h.data(), sizeof(T) * h.size(), cudaMemcpyHostToDevice);
    return d;
}

// the floats of got outside [skew, skew + size) are those of was
static bool outside_kept(const std::vector<float> &got, const std::vector<float> &was, int skew, size_t size) {
    for (size_t i = 0; i < got.size(); i++)
        if ((i < (size_t)skew || i >= skew + size) && memcmp(&got[i], &was[i], sizeof(float))) return false;
    return true;
}
// one shape under every thread order and cp.async timing; the output skew floats into its buffer (1: unpaired);
// fresh: dw's old values are not gradients (a deferred zeroing): written over, empty experts' with zeros
static void check_shape(const std::vector<int32_t> &rows_of, int N, int K, int skew, int fresh = 0) {
    const int E = (int)rows_of.size();
    std::vector<int32_t> off(E + 1, 0);
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + rows_of[e];
    const int rows = off[E];
    std::vector<__nv_bfloat16> g((size_t)rows * N), x((size_t)rows * K);
    for (auto &v : g) v = __float2bfloat16_rn(rnd());
    for (auto &v : x) v = __float2bfloat16_rn(rnd());
    const size_t n = (size_t)E * N * K + 2; // dw starts skew floats in, two floats around it in all
    std::vector<float> dw0(n);
    for (auto &v : dw0) v = rnd();
    std::vector<double> want(dw0.begin(), dw0.end());
    if (fresh) std::fill(want.begin() + skew, want.begin() + skew + (size_t)E * N * K, 0.0);
    double scale = 1e-12;
    for (int e = 0; e < E; e++)
        for (int i = 0; i < N; i++)
            for (int k = 0; k < K; k++) {
                double s = 0;
                for (int r = off[e]; r < off[e + 1]; r++)
                    s += (double)__bfloat162float(g[(size_t)r * N + i]) * __bfloat162float(x[(size_t)r * K + k]);
                want[skew + ((size_t)e * N + i) * K + k] += s;
                scale = fmax(scale, fabs(want[skew + ((size_t)e * N + i) * K + k]));
            }
    __nv_bfloat16 *d_g = upload(g), *d_x = upload(x);
    int32_t *d_off = upload(off);
    uint64_t first = 0;
    for (int order = 0; order < 5; order++)
        for (int deferred = 0; deferred < 2; deferred++) {
            ml_emu_set_order(order);
            ml_emu_set_cp_async(deferred);
            float *d_dw = upload(dw0);
            ml_expert_wgrad("expert_wgrad", d_dw + skew, d_g, d_x, d_off, off.data(), E, N, K, fresh);
            std::vector<float> got(n);
            cudaMemcpy(got.data(), d_dw, sizeof(float) * n, cudaMemcpyDeviceToHost);
            cudaFree(d_dw);
            double err = 0;
            for (size_t i = 0; i < n; i++) err = std::isnan(got[i]) ? INFINITY : fmax(err, fabs(got[i] - want[i]));
            bool kept = outside_kept(got, dw0, skew, (size_t)E * N * K);
            for (int e = 0; e < E; e++) // an empty expert's gradient: as it was, or zeros when fresh
                for (size_t i = 0; rows_of[e] == 0 && i < (size_t)N * K; i++) {
                    const size_t j = skew + (size_t)e * N * K + i;
                    kept = kept && (fresh ? got[j] == 0.f : !memcmp(&got[j], &dw0[j], sizeof(float)));
                }
            const uint64_t h = fnv(got);
            if (order == 0 && deferred == 0) first = h;
            CHECK(err / scale < 1e-5, "%d experts, N %d, K %d%s, order %d, cp.async %s: relative error %.3g (bound "
                  "1e-05)", E, N, K, fresh ? " (fresh)" : "", order, deferred ? "deferred" : "eager", err / scale);
            CHECK(kept, "%d experts, N %d, K %d%s: empty experts %s and the floats around dw untouched", E, N, K,
                  fresh ? " (fresh)" : "", fresh ? "zeroed" : "untouched");
            CHECK(h == first, "%d experts, N %d, K %d: order %d, cp.async %s gives the same bits as the first run", E,
                  N, K, order, deferred ? "deferred" : "eager");
        }
    cudaFree(d_g), cudaFree(d_x), cudaFree(d_off);
}

// the forward (out = inp_e W_e^T, rows x N) or the input gradient (out += dout_e W_e, rows x K) for one shape
static void check_matmul(const std::vector<int32_t> &rows_of, int N, int K, int dinp, int skew) {
    const int E = (int)rows_of.size(), R = dinp ? N : K, C = dinp ? K : N;
    std::vector<int32_t> off(E + 1, 0);
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + rows_of[e];
    const int rows = off[E];
    std::vector<__nv_bfloat16> a((size_t)rows * R), w((size_t)E * N * K);
    for (auto &v : a) v = __float2bfloat16_rn(rnd());
    for (auto &v : w) v = __float2bfloat16_rn(rnd());
    const size_t n = (size_t)rows * C + 2; // the output starts skew floats in, two floats around it in all
    std::vector<float> out0(n);
    for (auto &v : out0) v = rnd();
    std::vector<double> want(out0.begin(), out0.end());
    double scale = 1e-12;
    for (int e = 0; e < E; e++)
        for (int r = off[e]; r < off[e + 1]; r++)
            for (int c = 0; c < C; c++) {
                double s = 0;
                for (int k = 0; k < R; k++) // W_e is N x K: forward W[c][k], input gradient W[k][c]
                    s += (double)__bfloat162float(a[(size_t)r * R + k]) *
                         __bfloat162float(w[(size_t)e * N * K + (dinp ? (size_t)k * K + c : (size_t)c * K + k)]);
                double &o = want[skew + (size_t)r * C + c];
                o = dinp ? o + s : s;
                scale = fmax(scale, fabs(o));
            }
    __nv_bfloat16 *d_a = upload(a), *d_w = upload(w);
    int32_t *d_off = upload(off), *d_ts = upload(std::vector<int32_t>(E + 1, -1));
    uint64_t first = 0;
    const char *what = dinp ? "input gradient" : "forward";
    for (int order = 0; order < 5; order++)
        for (int deferred = 0; deferred < 2; deferred++) {
            ml_emu_set_order(order);
            ml_emu_set_cp_async(deferred);
            float *d_out = upload(out0);
            ml_expert_matmul("expert_matmul", dinp, d_out + skew, d_a, d_w, d_off, off.data(), d_ts, E, N, K);
            std::vector<float> got(n);
            cudaMemcpy(got.data(), d_out, sizeof(float) * n, cudaMemcpyDeviceToHost);
            cudaFree(d_out);
            double err = 0;
            for (size_t i = 0; i < n; i++) err = std::isnan(got[i]) ? INFINITY : fmax(err, fabs(got[i] - want[i]));
            const uint64_t h = fnv(got);
            if (order == 0 && deferred == 0) first = h;
            CHECK(err / scale < 1e-5, "experts' %s, %d experts, N %d, K %d, order %d, cp.async %s: relative error "
                  "%.3g (bound 1e-05)", what, E, N, K, order, deferred ? "deferred" : "eager", err / scale);
            CHECK(outside_kept(got, out0, skew, (size_t)rows * C), "experts' %s: the floats around the output "
                  "untouched", what);
            CHECK(h == first, "experts' %s, %d experts, N %d, K %d: order %d, cp.async %s gives the same bits as "
                  "the first run", what, E, N, K, order, deferred ? "deferred" : "eager");
        }
    cudaFree(d_a), cudaFree(d_w), cudaFree(d_off), cudaFree(d_ts);
}

int main() {
    for (int skew = 0; skew < 2; skew++) {
        check_shape({0, 1, 7, 32, 33, 200}, 136, 264, skew); // partial tiles both ways, partial and full chunks
        check_shape({40, 0}, 128, 128, skew);                // exactly one tile; the last expert empty
        check_shape({0, 1, 7, 32, 33, 200}, 136, 264, skew, 1); // written over, not added to
        ml_expert_wgrad_hot_rows = 33; // hot experts (33 and 200 rows) by cublasGemmEx, the rest here
        check_shape({0, 1, 7, 32, 33, 200}, 136, 264, skew);
        check_shape({0, 1, 7, 32, 33, 200}, 136, 264, skew, 1);
        ml_expert_wgrad_hot_rows = 2048;
        for (int dinp = 0; dinp < 2; dinp++) {
            check_matmul({0, 1, 7, 128, 129, 300, 0}, 136, 264, dinp, skew); // row tiles full, partial; empty experts
            check_matmul({3, 0}, 128, 128, dinp, skew);                      // one column tile, 4 reduction stages
        }
    }
    printf("expert_gemm_emu: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
