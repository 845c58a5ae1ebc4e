// emu_hash.h: a hash of a run's floats (FNV-1a over their bits), for the emulator tests' "the same bits" checks
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

static inline uint64_t fnv(const std::vector<float> &x) {
    uint64_t h = 1469598103934665603ull;
    for (float f : x) {
        uint32_t u;
        memcpy(&u, &f, 4);
        h = (h ^ u) * 1099511628211ull;
    }
    return h;
}
