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
    if (strcmp(name, "cuda") && strcmp(name, "auto"))
        return snprintf(msg, cap, "--backend: '%s' is not cpu, cuda or auto", name), ML_EINPUT;
#ifdef ML_HAVE_CUDA
    char why[256];
    if (cuda_available(why, sizeof why)) return *be = backend_cuda(), ML_OK;
    if (!strcmp(name, "auto")) return *be = backend_cpu(), ML_OK;
    return snprintf(msg, cap, "--backend cuda: no usable GPU (%s)", why), ML_EINPUT;
#else
    if (!strcmp(name, "auto")) return *be = backend_cpu(), ML_OK;
    return snprintf(msg, cap, "--backend cuda: this moelab was built without the CUDA backend (no nvcc at build time)"),
           ML_EINPUT;
#endif
}
