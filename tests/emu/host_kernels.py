#!/usr/bin/env python3
"""host_kernels.py IN.cu OUT.cpp: turns a kernels/attention*.cu file into host C++ for tests/emu/cuda_emu.h:
drops its includes, the __global__/__device__ qualifiers and the table fill function at the end, makes the
table entries (cu_attention_*, tc_attention_*) visible and points extern shared memory at the emulator's
buffer."""
import re
import sys

src, out = sys.argv[1], sys.argv[2]
text = open(src).read()
cut = text.find("\nvoid ml_cuda_fill_attention")
if cut < 0:
    sys.exit(f"{src}: no ml_cuda_fill_attention* to stop at")
text = text[:cut]
lines = []
for line in text.split("\n"):
    if line.startswith("#include"):
        continue
    line = line.replace("__global__ ", "").replace("__device__ ", "")
    line = re.sub(r"extern __shared__ __align__\(\d+\) unsigned char smem\[\];", "unsigned char *smem = g_smem;", line)
    line = re.sub(r"extern __shared__ float sm\[\];", "float *sm = (float *)g_smem;", line)
    line = re.sub(r"^static (void|size_t) (cu|tc)_attention", r"\1 \2_attention", line)
    lines.append(line)
open(out, "w").write('#include "cuda_emu.h"\n// generated from ' + src + " by tests/emu/host_kernels.py\n" + "\n".join(lines) + "\n")
