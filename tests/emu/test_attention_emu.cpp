// test_attention_emu.cpp: the CUDA backend's attention kernels run on the host under tests/emu/cuda_emu.h,
// against the CPU's attention in double precision (core/cpu/ops_cpu.c, _f64): kernels/attention_tc.cu (tensor
// cores, the cuda table; bounds 2e-2 for out and 5e-2 for dq, dk, dv, as the gpu suite's for bf16 tiles) and
// kernels/attention_cuda.cu (fp32, the cuda-fp32 table; 1e-5 and 1e-4). For each shape: the relative errors
// (gradients accumulated into nonzero ones), no deadlock or shared-memory overflow (the emulator exits non-zero);
// the tensor-core kernels' cp.async tiles completing as early (eager) and as late (deferred) as the hardware
// may, under five thread orders (lanes in lock-step rounds: ascending, descending, random; a warp at a time:
// ascending, descending), must give the same bits (a tile read before its wait, or refilled while a warp still
// reads it, shows), and so must the backward run in chunks of its dS workspace (a kv head over all sequences,
// and a sequence's kv head at a time) and dq by the strided fallback; then one
// shape under three thread orders must give the same bits (both implementations).
// This checks the kernels' indexing, masking, tiling and synchronisation; the hardware itself is checked by
// the gpu suite (tests/test_gpu_ops.c) on a GPU.
#include <vector>

#include "check.h"
#include "cuda_emu.h"
#include "emu_hash.h"

extern "C" {
#include "backend_cuda.h"
#include "ops_cpu.h"
}

size_t ml_attention_ds_bytes(int B, int T, int H, int KV); // the workspace the backward takes for that

struct impl {
    const char *name;
    const ml_backend *be;
    double tol_out, tol_grad;
};


static uint64_t rng_state = 88172645463325252ull;
static float rnd(float scale) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return scale * (2.0f * (float)(rng_state >> 40) / (float)(1 << 24) - 1.0f);
}
static double rel_err(const std::vector<double> &want, const std::vector<float> &got) {
    double num = 0, den = 1e-12;
    for (size_t i = 0; i < want.size(); i++) {
        num = std::isnan(got[i]) ? INFINITY : fmax(num, fabs(want[i] - got[i]));
        den = fmax(den, fabs(want[i]));
    }
    return num / den;
}

// runs one implementation on one shape under one thread order; returns a hash of out, dq, dk, dv
static uint64_t check_shape(const impl &im, int B, int T, int H, int KV, int hd, int order, bool compare,
                            int deferred = 0) {
    ml_emu_set_order(order);
    ml_emu_set_cp_async(deferred);
    const size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * KV * hd;
    std::vector<float> q(nq), k(nk), v(nk), go(nq), dq(nq), dk(nk), dv(nk), out(nq), att(2 * (size_t)B * H * T);
    rng_state = 88172645463325252ull ^ (uint64_t)(B * 7 + T * 131 + H * 17 + KV * 5 + hd);
    for (auto *x : {&q, &k, &v, &go})
        for (float &f : *x) f = rnd(1);
    for (auto *x : {&dq, &dk, &dv})
        for (float &f : *x) f = rnd(0.1f);
    std::vector<double> rq(q.begin(), q.end()), rk(k.begin(), k.end()), rv(v.begin(), v.end());
    std::vector<double> rgo(go.begin(), go.end()), rdq(dq.begin(), dq.end()), rdk(dk.begin(), dk.end());
    std::vector<double> rdv(dv.begin(), dv.end()), rout(nq), ratt((size_t)B * H * T * T);
    im.be->attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd);
    im.be->attention_backward(dq.data(), dk.data(), dv.data(), go.data(), out.data(), att.data(), q.data(), k.data(),
                              v.data(), B, T, H, KV, hd);
    char tag[128];
    snprintf(tag, sizeof tag, "%s B %d T %d H %d KV %d hd %d, thread order %d", im.name, B, T, H, KV, hd, order);
    if (compare) {
        attention_forward_f64(rout.data(), ratt.data(), rq.data(), rk.data(), rv.data(), B, T, H, KV, hd);
        attention_backward_f64(rdq.data(), rdk.data(), rdv.data(), rgo.data(), ratt.data(), rq.data(), rk.data(),
                               rv.data(), B, T, H, KV, hd);
        const double eo = rel_err(rout, out), eq = rel_err(rdq, dq), ek = rel_err(rdk, dk), ev = rel_err(rdv, dv);
        CHECK(eo < im.tol_out, "%s: out relative error %.3g (bound %.0e)", tag, eo, im.tol_out);
        CHECK(eq < im.tol_grad && ek < im.tol_grad && ev < im.tol_grad, "%s: dq %.3g dk %.3g dv %.3g (bound %.0e)",
              tag, eq, ek, ev, im.tol_grad);
        printf("%s: out %.2e dq %.2e dk %.2e dv %.2e\n", tag, eo, eq, ek, ev);
    }
    return fnv(out) ^ fnv(dq) * 3 ^ fnv(dk) * 5 ^ fnv(dv) * 7;
}

int main() {
    const impl tensor_cores = {"attention_tc", backend_cuda(), 2e-2, 5e-2};
    const impl fp32 = {"attention_cuda (fp32)", backend_cuda_fp32(), 1e-5, 1e-4};
    const int shapes[][5] = {
        {2, 16, 4, 2, 8},   // shorter than one tile, head size padded to 16
        {2, 77, 4, 4, 32},  // ragged tiles, no grouping
        {1, 300, 8, 2, 64}, // several tiles, groups of 4
        {1, 200, 4, 1, 96}, // Sigma-MoE-Tiny's head size, one kv head
        {1, 130, 2, 1, 128}, // the largest head size
        {1, 70, 3, 1, 40},  // groups of 3, head size padded to 48
        {1, 90, 2, 2, 6},   // a head size that is not a multiple of 4 (staged with zeros up to 16)
        {2, 1, 2, 1, 18},   // one token; head size 18 (padded to 32)
    };
    const int small_shapes[][5] = {
        // the fp32 kernels switch fibers at every shuffle (a key at a time): smaller shapes, same coverage
        {2, 16, 4, 2, 8},   // shorter than one tile
        {1, 77, 4, 4, 32},  // ragged tiles (32 keys), no grouping
        {1, 70, 3, 1, 40},  // groups of 3, a head size that is not a multiple of 32
        {1, 40, 2, 1, 128}, // the largest head size
        {1, 33, 4, 1, 96},  // Sigma-MoE-Tiny's head size, one key past a tile
    };
    for (const impl *im : {&tensor_cores, &fp32}) {
        if (im == &tensor_cores)
            for (const auto &s : shapes) {
                const uint64_t eager = check_shape(*im, s[0], s[1], s[2], s[3], s[4], 2, true);
                // dS (and dq) one kv head over all sequences at a time, then one sequence's kv head: the same bits
                const size_t Tp = (s[1] + 63) / 64 * 64, one_head = 2 * (size_t)s[0] * (s[2] / s[3]) * Tp * Tp;
                cuda_attention_set_ds_budget(one_head, 0);
                const uint64_t by_head = check_shape(*im, s[0], s[1], s[2], s[3], s[4], 2, false);
                cuda_attention_set_ds_budget(1, 0);
                const uint64_t by_sequence = check_shape(*im, s[0], s[1], s[2], s[3], s[4], 2, false);
                cuda_attention_set_ds_budget((size_t)512 << 20, 512);
                CHECK(by_head == eager && by_sequence == eager, "%s B %d T %d H %d KV %d hd %d: the backward a kv "
                      "head at a time (%s) and a sequence's kv head at a time (%s) give the same bits", im->name, s[0],
                      s[1], s[2], s[3], s[4], by_head == eager ? "same" : "differs",
                      by_sequence == eager ? "same" : "differs");
                // dq by a strided batch per query head (here a sequence at a time; below, the refusal test
                // runs it over whole chunks): the same products
                cuda_attention_set_dq_strided(1), cuda_attention_set_ds_budget(1, 0);
                const uint64_t strided = check_shape(*im, s[0], s[1], s[2], s[3], s[4], 2, false);
                cuda_attention_set_dq_strided(0), cuda_attention_set_ds_budget((size_t)512 << 20, 512);
                CHECK(strided == eager, "%s B %d T %d H %d KV %d hd %d: dq by a strided batch per query head gives "
                      "the same bits as by pointer-array batches", im->name, s[0], s[1], s[2], s[3], s[4]);
                for (int order = 0; order < 5; order++)
                    for (int deferred = 0; deferred < 2; deferred++) {
                        if (order == 2 && !deferred) continue; // that is the run above
                        const uint64_t h = check_shape(*im, s[0], s[1], s[2], s[3], s[4], order, false, deferred);
                        CHECK(h == eager, "%s B %d T %d H %d KV %d hd %d: thread order %d, cp.async completing %s: "
                              "the same bits", im->name, s[0], s[1], s[2], s[3], s[4], order,
                              deferred ? "at the wait" : "at issue");
                    }
            }
        else
            for (const auto &s : small_shapes) check_shape(*im, s[0], s[1], s[2], s[3], s[4], 2, true);
        if (im == &tensor_cores) { // a cuBLAS refusing the pointer-array batch: dq by the strided loop, same bits
            const uint64_t want = check_shape(*im, 2, 150, 4, 2, 24, 2, false);
            setenv("MOELAB_EMU_REFUSE", "pointer-batched", 1);
            const uint64_t got = check_shape(*im, 2, 150, 4, 2, 24, 2, false);
            unsetenv("MOELAB_EMU_REFUSE");
            CHECK(cuda_attention_set_dq_strided(0) == 1 && got == want,
                  "a refused pointer-array batch switches dq to the strided loop, with the same bits");
        }
        if (im == &tensor_cores) { // the workspace: dS of the chunk the budget allows, plus dq's pointer arrays
            const size_t one = 2 * 4 * (size_t)256 * 256, ptrs = 3 * sizeof(void *) * 4; // per sequence and kv head
            const size_t want[][2] = {{(size_t)512 << 20, 8 * 2 * one + 8 * 2 * 4 * ptrs}, // all of it
                                      {8 * one, 8 * one + 8 * 4 * ptrs},                   // a kv head, all sequences
                                      {3 * one + 5, 3 * one + 3 * 4 * ptrs},               // a kv head, 3 sequences
                                      {1, one + 4 * ptrs}};                                // a sequence's kv head
            for (const auto &w : want) {
                cuda_attention_set_ds_budget(w[0], 0);
                const size_t got = ml_attention_ds_bytes(8, 200, 8, 2); // groups of 4, Tp 256
                CHECK(got == w[1], "dS workspace under a budget of %zu bytes: %zu (want %zu)", w[0], got, w[1]);
            }
            // the floor of 512 backward blocks (4 per pair here) keeps all 16 pairs in one chunk
            cuda_attention_set_ds_budget(1, 512);
            CHECK(ml_attention_ds_bytes(8, 200, 8, 2) == want[0][1], "dS chunks keep at least 512 blocks");
            cuda_attention_set_ds_budget((size_t)512 << 20, 512); // the defaults, at Sigma-MoE-Tiny's heads (16 / 4)
            const size_t big = 2 * 4 * (size_t)8192 * 8192, mid = 2 * 4 * (size_t)4096 * 4096;
            CHECK(ml_attention_ds_bytes(8, 8192, 16, 4) == 4 * big + 4 * 4 * ptrs,
                  "8 x 8192: 4 sequences of a kv head per chunk (512 blocks; one kv head would be 4.3 GB)");
            CHECK(ml_attention_ds_bytes(2, 4096, 16, 4) == 8 * mid + 8 * 4 * ptrs,
                  "2 x 4096: every kv head in one chunk (the 512 MB budget alone would take 2, 256 blocks)");
            CHECK(ml_attention_ds_bytes(8, 2048, 16, 4) == 16 * mid / 4 + 16 * 4 * ptrs,
                  "8 x 2048: 2 kv heads per chunk (512 MB, 512 blocks)");
        }
        const uint64_t h0 = check_shape(*im, 1, 45, 4, 2, 24, 0, false);
        const uint64_t h1 = check_shape(*im, 1, 45, 4, 2, 24, 1, false), h2 = check_shape(*im, 1, 45, 4, 2, 24, 2, false);
        CHECK(h0 == h1 && h1 == h2, "%s: thread orders ascending, descending and random give the same bits", im->name);
    }
    printf("attention_emu: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
