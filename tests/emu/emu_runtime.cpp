// emu_runtime.cpp: the scheduler and runtime behind cuda_emu.h. A launch runs its blocks one after another.
// The first block runs its threads as fibers in the chosen order until each reaches a barrier or ends; a warp
// barrier releases when all lanes of that warp wait, a block barrier when every thread waits; anything else
// is a deadlock. If no thread of the first block met a barrier, the other blocks run their threads as plain
// calls (fast; a barrier met there after all is reported and exits 7). Fibers switch with _setjmp/_longjmp
// (no signal-mask system call per switch). Dynamic shared memory is filled with NaN bytes before each block
// and followed by a canary.
#undef _FORTIFY_SOURCE
#include <iterator>
#include <map>
#include <random>
#include <setjmp.h>
#include <ucontext.h>
#include <vector>

#include "cuda_emu.h"

ml_emu_idx blockIdx, gridDim, blockDim;
// the threadIdx of the block's i-th thread (x fastest, as warps are formed)
static ml_emu_idx thread_idx(int i) {
    const unsigned u = (unsigned)i;
    return {u % blockDim.x, u / blockDim.x % blockDim.y, u / (blockDim.x * blockDim.y)};
}
int ml_emu_cur;

namespace {
enum { RUN, WARP_WAIT, BLOCK_WAIT, DONE };
struct fiber {
    ucontext_t ctx;
    jmp_buf jb;
    int state, started;
    ml_emu_idx idx;
};
const size_t STACK = 256 * 1024, CANARY = 4096;
fiber fibers[1024];
std::vector<char *> stacks;
jmp_buf scheduler;
std::function<void()> *body;
int order, direct, barrier_met;
std::mt19937 shuffle_rng(1);
unsigned char *smem_buf;
size_t smem_size;
std::map<const void *, size_t> smem_attr; // per kernel, as cudaFuncSetAttribute sets it

void entry() {
    (*body)();
    fibers[ml_emu_cur].state = DONE;
    _longjmp(scheduler, 1);
}

// runs fiber i until it waits at a barrier or ends
void resume(int i) {
    ml_emu_cur = i;
    if (_setjmp(scheduler)) return;
    if (!fibers[i].started) {
        fibers[i].started = 1;
        setcontext(&fibers[i].ctx);
    }
    _longjmp(fibers[i].jb, 1);
}

void run_block_fibers(int n) {
    while ((int)stacks.size() < n) stacks.push_back((char *)malloc(STACK));
    for (int i = 0; i < n; i++) {
        getcontext(&fibers[i].ctx);
        fibers[i].ctx.uc_stack.ss_sp = stacks[i];
        fibers[i].ctx.uc_stack.ss_size = STACK;
        fibers[i].ctx.uc_link = nullptr;
        makecontext(&fibers[i].ctx, entry, 0);
        fibers[i].state = RUN, fibers[i].started = 0;
        fibers[i].idx = thread_idx(i);
    }
    std::vector<int> seq(n);
    for (;;) {
        for (int i = 0; i < n; i++) seq[i] = order == 1 ? n - 1 - i : i;
        if (order == 2) std::shuffle(seq.begin(), seq.end(), shuffle_rng);
        if (order >= 3) { // one warp at a time up to a block barrier or its end (warps as far apart as they get)
            const int warps = (n + 31) / 32;
            for (int k = 0; k < warps; k++) {
                const int w = order == 3 ? k : warps - 1 - k, lanes = std::min(32, n - w * 32);
                for (bool again = true; again;) {
                    int waiting = 0;
                    for (int l = 0; l < lanes; l++)
                        if (fibers[w * 32 + l].state == RUN) resume(w * 32 + l);
                    for (int l = 0; l < lanes; l++) waiting += fibers[w * 32 + l].state == WARP_WAIT;
                    if ((again = waiting == lanes))
                        for (int l = 0; l < lanes; l++) fibers[w * 32 + l].state = RUN;
                }
            }
        }
        for (int i : seq)
            if (fibers[i].state == RUN) resume(i);
        int done = 0, at_block = 0;
        bool released = false;
        for (int i = 0; i < n; i++) done += fibers[i].state == DONE, at_block += fibers[i].state == BLOCK_WAIT;
        if (done == n) return;
        for (int w = 0; w * 32 < n; w++) {
            int lanes = std::min(32, n - w * 32), waiting = 0;
            for (int l = 0; l < lanes; l++) waiting += fibers[w * 32 + l].state == WARP_WAIT;
            if (waiting == lanes) {
                for (int l = 0; l < lanes; l++) fibers[w * 32 + l].state = RUN;
                released = true;
            } else if (waiting) {
                fprintf(stderr, "cuda_emu: deadlock: warp %d has %d of %d lanes at a warp barrier or shuffle, the others "
                        "elsewhere (block %u,%u,%u)\n", w, waiting, lanes, blockIdx.x, blockIdx.y, blockIdx.z);
                exit(4);
            }
        }
        if (released) continue;
        if (at_block == n) {
            for (int i = 0; i < n; i++) fibers[i].state = RUN;
            continue;
        }
        fprintf(stderr, "cuda_emu: deadlock: %d of %d threads at __syncthreads, %d finished (block %u,%u,%u)\n",
                at_block, n, done, blockIdx.x, blockIdx.y, blockIdx.z);
        exit(4);
    }
}

void run_block_direct(int n) {
    for (int i = 0; i < n; i++) {
        fibers[i].idx = thread_idx(i);
        ml_emu_cur = i;
        (*body)();
    }
}
} // namespace

// ---- cp.async: per-thread open copies and committed groups ----
namespace {
struct cp_copy {
    void *dst;
    const void *src;
};
int cp_deferred;
std::map<uintptr_t, size_t> device_allocs; // cudaMalloc's blocks: base -> bytes asked for
std::vector<cp_copy> cp_open[1024];
std::vector<std::vector<cp_copy>> cp_groups[1024];
void cp_reset(int n) {
    for (int i = 0; i < n; i++) cp_open[i].clear(), cp_groups[i].clear();
}
} // namespace

void ml_emu_check_smem16(const void *p, const char *what) {
    const unsigned char *c = (const unsigned char *)p;
    if (((uintptr_t)c & 15) || c < smem_buf || c + 16 > smem_buf + smem_size) {
        fprintf(stderr, "cuda_emu: %s: shared address %p not 16-byte aligned inside the block's %zu bytes (block "
                "%u,%u,%u thread %d)\n", what, p, smem_size, blockIdx.x, blockIdx.y, blockIdx.z, ml_emu_cur);
        exit(8);
    }
}
void ml_emu_set_cp_async(int deferred) { cp_deferred = deferred; }
void ml_emu_cp_async16(void *dst, const void *src) {
    ml_emu_check_smem16(dst, "cp.async destination");
    auto in = device_allocs.upper_bound((uintptr_t)src); // the block at or before src
    if (((uintptr_t)src & 15) || in == device_allocs.begin() ||
        (uintptr_t)src + 16 > std::prev(in)->first + std::prev(in)->second) {
        fprintf(stderr, "cuda_emu: cp.async: global source %p not 16-byte aligned inside one cudaMalloc block\n", src);
        exit(8);
    }
    if (cp_deferred) cp_open[ml_emu_cur].push_back(cp_copy{dst, src});
    else memcpy(dst, src, 16);
}
void ml_emu_cp_async_commit(void) {
    cp_groups[ml_emu_cur].push_back(std::move(cp_open[ml_emu_cur]));
    cp_open[ml_emu_cur].clear();
}
void ml_emu_cp_async_wait(int n) { // all but the n most recent groups complete
    auto &groups = cp_groups[ml_emu_cur];
    while ((int)groups.size() > n) {
        for (const cp_copy &c : groups.front()) memcpy(c.dst, c.src, 16);
        groups.erase(groups.begin());
    }
}

const ml_emu_idx &ml_emu_thread_idx(void) { return fibers[ml_emu_cur].idx; }
void ml_emu_set_order(int o) { order = o, shuffle_rng.seed(1); }
unsigned char *ml_emu_smem(void) { return smem_buf; }

void ml_emu_barrier(int kind) {
    if (direct) {
        fprintf(stderr, "cuda_emu: a barrier in block %u,%u,%u of a kernel whose first block met none\n", blockIdx.x,
                blockIdx.y, blockIdx.z);
        exit(7);
    }
    barrier_met = 1;
    fiber *f = &fibers[ml_emu_cur];
    f->state = kind == 1 ? WARP_WAIT : BLOCK_WAIT;
    if (!_setjmp(f->jb)) _longjmp(scheduler, 1);
}

void ml_emu_launch(const void *kernel, dim3 grid, dim3 block_dim, size_t smem, std::function<void()> fn) {
    const int block = (int)(block_dim.x * block_dim.y * block_dim.z);
    if (block < 1 || block > 1024 || block_dim.z > 64) {
        fprintf(stderr, "cuda_emu: launch with %u x %u x %u threads per block\n", block_dim.x, block_dim.y,
                block_dim.z);
        exit(5);
    }
    if (smem > 48 * 1024 && smem > smem_attr[kernel]) {
        fprintf(stderr, "cuda_emu: %zu bytes of dynamic shared memory without the attribute (%zu)\n", smem,
                smem_attr[kernel]);
        exit(5);
    }
    if (smem > 166912) { // the build targets sm_80 too: the A100's 163 KB per block (the H100 takes 227 KB)
        fprintf(stderr, "cuda_emu: %zu bytes of dynamic shared memory: above the A100's limit\n", smem);
        exit(5);
    }
    if (grid.y > 65535 || grid.z > 65535) {
        fprintf(stderr, "cuda_emu: grid %u x %u x %u\n", grid.x, grid.y, grid.z);
        exit(5);
    }
    body = &fn;
    blockDim = {block_dim.x, block_dim.y, block_dim.z}, gridDim = {grid.x, grid.y, grid.z};
    smem_size = smem;
    smem_buf = (unsigned char *)aligned_alloc(256, (smem + CANARY + 255) / 256 * 256);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                memset(smem_buf, 0xff, smem + CANARY); // NaN everywhere: uninitialised reads show
                cp_reset(block); // copies a block left pending land in its dead shared memory: dropped
                blockIdx = {x, y, z};
                const bool first = x == 0 && y == 0 && z == 0;
                if (first) barrier_met = 0;
                // blocks after a first one that met no barrier run thread after thread, without fibers (fast);
                // not for kernels with dynamic shared memory, whose blocks may skip their barriers (an early
                // exit) in the first block only
                direct = !first && !barrier_met && smem == 0;
                if (direct) run_block_direct(block);
                else run_block_fibers(block);
                direct = 0;
                for (size_t i = smem; i < smem + CANARY; i++)
                    if (smem_buf[i] != 0xff) {
                        fprintf(stderr, "cuda_emu: shared memory written past its %zu bytes\n", smem);
                        exit(6);
                    }
            }
    free(smem_buf);
    smem_buf = nullptr;
}

// ---- runtime API: device memory is host memory; everything is synchronous ----

// everything is synchronous, so an event's time is the host's clock when it is recorded
struct ml_emu_event {
    double t;
};
#include <time.h>
static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}
cudaError_t cudaMalloc(void **p, size_t bytes) {
    *p = aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (*p) device_allocs[(uintptr_t)*p] = bytes, memset(*p, 0xff, bytes); // NaN: as unset as cudaMalloc's
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
// pinned host memory: not the device's (cudaMemGetInfo leaves it out, as the driver does)
cudaError_t cudaMallocHost(void **p, size_t bytes) {
    *p = aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (*p) memset(*p, 0xff, bytes);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void *p) { return device_allocs.erase((uintptr_t)p), free(p), cudaSuccess; }
cudaError_t cudaFreeHost(void *p) { return free(p), cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) { // an 80 GiB device holding what was allocated
    size_t used = 0;
    for (const auto &a : device_allocs) used += a.second;
    *total = (size_t)80 << 30, *free_bytes = used < *total ? *total - used : 0;
    return cudaSuccess;
}
cudaError_t cudaMemset(void *p, int v, size_t bytes) { return memset(p, v, bytes), cudaSuccess; }
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t) { return cudaMemset(p, v, bytes); }
// Asynchronous copies to the host are as late as the hardware may make them: the source is read when the copy
// is queued (stream order), the host sees the bytes only at the next synchronizing call, so a host read that
// misses its sync sees stale bytes here too.
struct pending_copy {
    void *dst;
    std::vector<char> bytes;
};
static std::vector<pending_copy> pending_copies;
static void land_copies() {
    for (pending_copy &c : pending_copies) memcpy(c.dst, c.bytes.data(), c.bytes.size());
    pending_copies.clear();
}
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind) {
    land_copies();
    return memmove(dst, src, bytes), cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind k, cudaStream_t) {
    if (k != cudaMemcpyDeviceToHost) return memmove(dst, src, bytes), cudaSuccess;
    pending_copies.push_back(pending_copy{dst, std::vector<char>((const char *)src, (const char *)src + bytes)});
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return land_copies(), cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) { return e ? "emulated error" : "no error"; }
cudaError_t cudaGetDeviceCount(int *n) { return *n = 1, cudaSuccess; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "CUDA emulator on the host (tests/emu)");
    p->major = 9, p->minor = 0;
    p->totalGlobalMem = (size_t)80 << 30; // as cudaMemGetInfo says
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *e) { return *e = new ml_emu_event{now_ms()}, cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) { return e->t = now_ms(), cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return land_copies(), cudaSuccess; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) { return *ms = (float)(b->t - a->t), cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { return delete e, cudaSuccess; }
cudaError_t ml_emu_func_set_attribute(const void *kernel, cudaFuncAttribute, int v) {
    return smem_attr[kernel] = (size_t)v, cudaSuccess;
}
