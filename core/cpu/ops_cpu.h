/* ops_cpu.h: the CPU reference ops (OpenBLAS + OpenMP), in float for the backend and in double
 * (names ending _f64) for the finite-difference tests. See ops_cpu_decl.h for the contracts. */
#ifndef MOELAB_OPS_CPU_H
#define MOELAB_OPS_CPU_H

#include "ops_types.h"

#define OPS_REAL float
#define OPS_NAME(n) n
#include "ops_cpu_decl.h"
#undef OPS_REAL
#undef OPS_NAME

#define OPS_REAL double
#define OPS_NAME(n) n##_f64
#include "ops_cpu_decl.h"
#undef OPS_REAL
#undef OPS_NAME

#endif
