// emu_runtime.cpp: the scheduler behind cuda_emu.h: runs each block's threads as fibers until all finish,
// releasing __syncwarp when all 32 lanes of a warp wait and __syncthreads when every thread waits; launches
// check the dynamic shared memory against the attribute and the H100 limit, fill shared memory with NaN (so
// uninitialised reads show) and check a canary after it (so overflowing writes show).
#include "cuda_emu.h"
#include <sys/mman.h>
Fiber *g_fib; int g_nthreads, g_cur; ucontext_t g_sched;
uint3_ blockIdx, gridDim, blockDim;
unsigned char *g_smem; size_t g_smem_size; float g_shfl[1024]; long g_wmma_violations; int g_order; size_t g_smem_attr;
static std::function<void()> *g_body; static std::mt19937 g_rng(1);
static void entry() { (*g_body)(); g_fib[g_cur].state = DONE; swapcontext(&g_fib[g_cur].ctx, &g_sched); }
static const size_t STK = 512 * 1024;
static std::vector<char *> stacks;
void run_block(std::function<void()> body) {
    g_body = &body;
    int n = g_nthreads;
    if ((int)stacks.size() < n) for (int i = stacks.size(); i < n; i++) stacks.push_back((char *)malloc(STK));
    for (int i = 0; i < n; i++) {
        getcontext(&g_fib[i].ctx); g_fib[i].ctx.uc_stack.ss_sp = stacks[i]; g_fib[i].ctx.uc_stack.ss_size = STK;
        g_fib[i].ctx.uc_link = nullptr; makecontext(&g_fib[i].ctx, entry, 0);
        g_fib[i].state = RUN; g_fib[i].tidx = {(unsigned)i, 0, 0};
    }
    std::vector<int> ord(n);
    for (;;) {
        for (int i = 0; i < n; i++) ord[i] = g_order == 1 ? n - 1 - i : i;
        if (g_order == 2) std::shuffle(ord.begin(), ord.end(), g_rng);
        for (int i : ord) if (g_fib[i].state == RUN) { g_cur = i; swapcontext(&g_sched, &g_fib[i].ctx); }
        int done = 0, bw = 0; bool rel = false;
        for (int i = 0; i < n; i++) done += g_fib[i].state == DONE, bw += g_fib[i].state == BWAIT;
        if (done == n) break;
        for (int w = 0; w < n / 32; w++) {
            int c = 0; for (int l = 0; l < 32; l++) c += g_fib[w * 32 + l].state == WWAIT;
            if (c == 32) { for (int l = 0; l < 32; l++) g_fib[w * 32 + l].state = RUN; rel = true; }
            else if (c) { fprintf(stderr, "DEADLOCK: warp %d has %d lanes at __syncwarp/shfl, others elsewhere\n", w, c); exit(4); }
        }
        if (rel) continue;
        if (bw == n) { for (int i = 0; i < n; i++) g_fib[i].state = RUN; continue; }
        fprintf(stderr, "DEADLOCK: %d at __syncthreads, %d done of %d\n", bw, done, n); exit(4);
    }
}
void run_kernel(dim3 grid, int block, size_t smem, std::function<void()> body) {
    if (smem > 48 * 1024 && smem > g_smem_attr) { fprintf(stderr, "launch: smem %zu > attribute %zu\n", smem, g_smem_attr); exit(5); }
    if (smem > 232448) { fprintf(stderr, "launch: smem %zu above H100 limit\n", smem); exit(5); }
    if (smem > 166912) { static int once; if (!once++) fprintf(stderr, "note: smem %zu above A100 limit\n", smem); }
    g_nthreads = block; blockDim = {(unsigned)block, 1, 1}; gridDim = {grid.x, grid.y, grid.z};
    static Fiber fibs[1024]; g_fib = fibs;
    const size_t canary = 4096;
    unsigned char *buf = (unsigned char *)aligned_alloc(256, smem + canary + 256);
    g_smem = buf; g_smem_size = smem;
    for (unsigned z = 0; z < grid.z; z++) for (unsigned y = 0; y < grid.y; y++) for (unsigned x = 0; x < grid.x; x++) {
        memset(buf, 0xff, smem + canary); // NaN everywhere: uninitialised reads show
        blockIdx = {x, y, z};
        run_block(body);
        for (size_t i = smem; i < smem + canary; i++) if (buf[i] != 0xff) { fprintf(stderr, "smem overflow write at %zu (size %zu)\n", i, smem); exit(6); }
    }
    free(buf);
}
