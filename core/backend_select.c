/* backend_select.c: choosing the op table by name (see backend.h). */
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "err.h"
#ifdef ML_HAVE_CUDA
#include "backend_cuda.h"
#endif

int backend_select(const char *name, const ml_backend **be, char *msg, size_t cap) {
    if (!name || !name[0] || !strcmp(name, "cpu")) return *be = backend_cpu(), ML_OK;
    const int fp32 = !strcmp(name, "cuda-fp32");
    if (strcmp(name, "cuda") && !fp32 && strcmp(name, "auto"))
        return snprintf(msg, cap, "--backend: '%s' is not cpu, cuda, cuda-fp32 or auto", name), ML_EINPUT;
#ifdef ML_HAVE_CUDA
    char why[256];
    if (cuda_available(why, sizeof why)) return *be = fp32 ? backend_cuda_fp32() : backend_cuda(), ML_OK;
    if (!strcmp(name, "auto")) return *be = backend_cpu(), ML_OK;
    return snprintf(msg, cap, "--backend %s: no usable GPU (%s)", name, why), ML_EINPUT;
#else
    if (!strcmp(name, "auto")) return *be = backend_cpu(), ML_OK;
    return snprintf(msg, cap, "--backend %s: this moelab was built without the CUDA backend (no nvcc at build time)",
                    name),
           ML_EINPUT;
#endif
}
