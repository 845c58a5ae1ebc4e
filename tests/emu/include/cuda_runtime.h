// cuda_runtime.h for tests/emu: the host emulator stands in for the CUDA toolkit
#pragma once
#include "cuda_emu.h"
