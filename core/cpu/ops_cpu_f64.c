/* ops_cpu_f64.c: the CPU ops in double precision, for finite-difference gradient checks only. */
#define OPS_DOUBLE
#include "ops_cpu.c"
