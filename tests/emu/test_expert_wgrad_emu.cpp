// test_expert_wgrad_emu.cpp: kernels/expert_wgrad.cu (the cuda table's expert weight gradients on tensor cores)
// on the host under tests/emu/cuda_emu.h, against a double-precision reference. Shapes with partial tiles (dw
// rows and columns past a 128-wide tile) and experts of 0, 1, 7, 32, 33 and 200 rows (a partial last chunk of
// 32, several chunks), added onto a gradient that already holds values, from a dw offset by one float (the
// unpaired stores). Inputs are bf16 values, so each product is exact in fp32: the bound is fp32 summation's.
// Under five thread orders and cp.async copies completing as early and as late as the hardware may, every run
// must give the same bits (a stage read before its wait, or refilled while a warp still reads it, shows); the
// empty expert's gradient and the floats around dw must stay as they were. Once more with the hot experts (many
// rows) handed to cublasGemmEx beside the kernel.
#include <vector>

#include "check.h"
#include "cuda_emu.h"
#include "emu_hash.h"

void ml_expert_wgrad(const char *op, float *dw, const __nv_bfloat16 *dout, const __nv_bfloat16 *inp,
                     const int32_t *offsets, const int32_t *offsets_host, int E, int N, int K); // expert_wgrad.cu
extern int ml_expert_wgrad_hot_rows; // experts with this many rows or more: one cublasGemmEx each

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

// one shape under every thread order and cp.async timing
static void check_shape(const std::vector<int32_t> &rows_of, int N, int K) {
    const int E = (int)rows_of.size();
    std::vector<int32_t> off(E + 1, 0);
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + rows_of[e];
    const int rows = off[E];
    std::vector<__nv_bfloat16> g((size_t)rows * N), x((size_t)rows * K);
    for (auto &v : g) v = __float2bfloat16_rn(rnd());
    for (auto &v : x) v = __float2bfloat16_rn(rnd());
    const size_t n = (size_t)E * N * K + 2; // dw starts one float in: a float before it and one after
    std::vector<float> dw0(n);
    for (auto &v : dw0) v = rnd();
    std::vector<double> want(dw0.begin(), dw0.end());
    double scale = 1e-12;
    for (int e = 0; e < E; e++)
        for (int i = 0; i < N; i++)
            for (int k = 0; k < K; k++) {
                double s = 0;
                for (int r = off[e]; r < off[e + 1]; r++)
                    s += (double)__bfloat162float(g[(size_t)r * N + i]) * __bfloat162float(x[(size_t)r * K + k]);
                want[1 + ((size_t)e * N + i) * K + k] += s;
                scale = fmax(scale, fabs(want[1 + ((size_t)e * N + i) * K + k]));
            }
    __nv_bfloat16 *d_g = upload(g), *d_x = upload(x);
    int32_t *d_off = upload(off);
    uint64_t first = 0;
    for (int order = 0; order < 5; order++)
        for (int deferred = 0; deferred < 2; deferred++) {
            ml_emu_set_order(order);
            ml_emu_set_cp_async(deferred);
            float *d_dw = upload(dw0);
            ml_expert_wgrad("expert_wgrad", d_dw + 1, d_g, d_x, d_off, off.data(), E, N, K);
            std::vector<float> got(n);
            cudaMemcpy(got.data(), d_dw, sizeof(float) * n, cudaMemcpyDeviceToHost);
            cudaFree(d_dw);
            double err = 0;
            for (size_t i = 0; i < n; i++) err = std::isnan(got[i]) ? INFINITY : fmax(err, fabs(got[i] - want[i]));
            bool kept = got[0] == dw0[0] && got[n - 1] == dw0[n - 1];
            for (int e = 0; e < E; e++)
                if (rows_of[e] == 0)
                    kept = kept && !memcmp(&got[1 + (size_t)e * N * K], &dw0[1 + (size_t)e * N * K], sizeof(float) * N * K);
            const uint64_t h = fnv(got);
            if (order == 0 && deferred == 0) first = h;
            CHECK(err / scale < 1e-5, "%d experts, N %d, K %d, order %d, cp.async %s: relative error %.3g (bound 1e-05)",
                  E, N, K, order, deferred ? "deferred" : "eager", err / scale);
            CHECK(kept, "%d experts, N %d, K %d: empty experts and the floats around dw untouched", E, N, K);
            CHECK(h == first, "%d experts, N %d, K %d: order %d, cp.async %s gives the same bits as the first run", E,
                  N, K, order, deferred ? "deferred" : "eager");
        }
    cudaFree(d_g), cudaFree(d_x), cudaFree(d_off);
}

int main() {
    check_shape({0, 1, 7, 32, 33, 200}, 136, 264); // partial tiles both ways, partial and full chunks
    check_shape({40, 0}, 128, 128);                // exactly one tile; the last expert empty
    ml_expert_wgrad_hot_rows = 33;                 // hot experts (33 and 200 rows) by cublasGemmEx, the rest here
    check_shape({0, 1, 7, 32, 33, 200}, 136, 264);
    ml_expert_wgrad_hot_rows = 2048;
    printf("expert_wgrad_emu: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
