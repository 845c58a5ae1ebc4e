#!/usr/bin/env bash
# tests/gpu/run.sh: on a GPU machine, builds moelab with the CUDA backend, runs the gpu test suite (every op
# against the CPU, whole steps, bf16 against fp32 over 50 steps, determinism), then for each preset the GPU
# benchmark in bf16 (--backend cuda) and fp32 (cuda-fp32) beside the same model and step in PyTorch eager
# (bf16 autocast and fp32), then Nsight Compute's per-kernel summary of one Sigma-width layer (where ncu works),
# and prints one summary table with the moelab / PyTorch ratios.
#   tests/gpu/run.sh [PRESET[:key=value,...][@VAR=value,...] ...]
# default: tiny, small-cpu, then the full Sigma-MoE-Tiny width at 4 layers with 2 x 4K and 8 x 2K tokens per
# micro-batch (bf16 only), the latter also with the experts' weight gradients by cuBLAS instead of moelab's
# kernel (@MOELAB_EXPERT_WGRAD=cublas: environment for moelab only; no PyTorch row), with the experts' forward
# and input gradient by moelab's kernel instead of cuBLAS (@MOELAB_EXPERT_MATMUL=moelab) and with 4 micro-batches
# per optimizer step (train.accum=4: a 64K-token step, where AdamW's fixed cost over all 1.4 B parameters is
# shared by four micro-batches, as in real training), and at 32 x 2K tokens per micro-batch (55 GiB by moelab plan:
# the experts' weights, read and their gradients written once per micro-batch, shared by 4x the tokens; no
# PyTorch row, as for any spec with '@'); the PyTorch side runs only where the reference model covers the config.
# MOELAB_GPU_OPS=0 skips the test suite (e.g. a second call with more presets). Each stage runs under a time
# limit (MOELAB_GPU_OPS_TIMEOUT, MOELAB_GPU_BENCH_TIMEOUT seconds); MOELAB_GPU_STEPS steps.
# Needs: nvcc (or a build folder made elsewhere with -Dcuda=enabled), the NVIDIA driver, and the libraries the
# binary links (OpenBLAS, HDF5, SQLite, libyaml, pcre2; LD_LIBRARY_PATH may point at copies).
# The full bench JSON lines (per-op breakdown included) are kept in $OUT or /tmp/moelab_gpu_bench.jsonl.
# MOELAB_PREBUILT=DIR: take DIR/bin/moelab and DIR/bin/test_gpu_ops (tests/gpu/pack.sh) instead of building;
# the CUDA runtime and cuBLAS then come from /usr/local/cuda/lib64 or PyTorch's nvidia packages.
set -uo pipefail
cd "$(dirname "$0")/../.."
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(tiny small-cpu "sigma-tiny-full:model.layers=4,train.batch=2"
    "sigma-tiny-full:model.layers=4,train.batch=8,model.seq_len=2048"
    "sigma-tiny-full:model.layers=4,train.batch=8,model.seq_len=2048@MOELAB_EXPERT_WGRAD=cublas"
    "sigma-tiny-full:model.layers=4,train.batch=8,model.seq_len=2048@MOELAB_EXPERT_MATMUL=moelab"
    "sigma-tiny-full:model.layers=4,train.batch=8,model.seq_len=2048,train.accum=4"
    "sigma-tiny-full:model.layers=4,train.batch=32,model.seq_len=2048@")
if [ -n "${MOELAB_PREBUILT:-}" ]; then
    moelab=$MOELAB_PREBUILT/bin/moelab gpu_ops=$MOELAB_PREBUILT/bin/test_gpu_ops
    nv=$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null)
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64${nv:+:$nv}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
    moelab=build/moelab gpu_ops=build/tests/test_gpu_ops
    if [ ! -f build/build.ninja ]; then meson setup build -Dcuda=enabled || exit 2; fi
    ninja -C build || exit 2
fi
logs=${OUT:-/tmp}
jsonl=$logs/moelab_gpu_bench.jsonl
: >"$jsonl"
# each stage under a time limit (a hung kernel must not take the whole lease); logs kept beside the JSONL
ops_limit=${MOELAB_GPU_OPS_TIMEOUT:-300} bench_limit=${MOELAB_GPU_BENCH_TIMEOUT:-120}
# which tables and PyTorch precisions to time, and how many steps (MOELAB_GPU_BACKENDS="cuda" skips cuda-fp32).
# By default the Sigma-width presets (gpu-small, sigma-tiny-full) run bf16 only: fp32 there is verification
# speed (minutes per spec), and the suite above already checks fp32 against the CPU.
read -ra all_backends <<<"${MOELAB_GPU_BACKENDS:-cuda cuda-fp32}"
read -ra all_dtypes <<<"${MOELAB_GPU_DTYPES:-bf16 fp32}"
steps=${MOELAB_GPU_STEPS:-10}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
if [ "${MOELAB_GPU_OPS:-1}" != 0 ]; then
    timeout "$ops_limit" "$gpu_ops" 2>&1 | tee "$logs/moelab_gpu_ops.txt"
    ops_rc=${PIPESTATUS[0]}
else
    echo "SKIP: MOELAB_GPU_OPS=0" >"$logs/moelab_gpu_ops.txt"
    ops_rc=77
fi

# vocabulary 8192 everywhere, so that both sides read the same config (written by a zero-step moelab train,
# which needs the token shards of data/tokens/vocab8192: carry them or run moelab data prepare)
common=(model.vocab=8192 data.dir=data/tokens/vocab8192)
tmp=$(mktemp -d)
rows=()
for spec in "${presets[@]}"; do
    run_env=()
    [[ $spec == *@* ]] && IFS=, read -ra run_env <<<"${spec#*@}"
    cfg=${spec%%@*}
    p=${cfg%%:*} extra=()
    [[ $cfg == *:* ]] && IFS=, read -ra extra <<<"${cfg#*:}"
    backends=("${all_backends[@]}") dtypes=("${all_dtypes[@]}")
    if [[ $p == gpu-small || $p == sigma-tiny-full ]]; then
        [ -z "${MOELAB_GPU_BACKENDS:-}" ] && backends=(cuda)
        [ -z "${MOELAB_GPU_DTYPES:-}" ] && dtypes=(bf16)
    fi
    for be in "${backends[@]}"; do
        out=$(env "${run_env[@]}" timeout "$bench_limit" "$moelab" bench "preset=$p" "${common[@]}" "${extra[@]}" --backend $be --steps "$steps" \
            --json 2>"$logs/bench_err.txt" | tail -1)
        [ -n "$out" ] || out="error: $(tail -c 300 "$logs/bench_err.txt" | tr '\n' ' ')"
        echo "$out" >>"$jsonl"
        rows+=("$spec $be|$out")
    done
    [[ $spec == *@* ]] && continue # the same model as the spec without them, or '@' alone: no PyTorch row
    d=$tmp/run${#rows[@]} # one folder per spec: a preset may come back with other keys
    if "$moelab" train "preset=$p" "${common[@]}" "${extra[@]}" train.steps=0 run.dir="$d" run.db= >/dev/null 2>&1; then
        for dt in "${dtypes[@]}"; do
            # bf16 twice: the reference model's attention, then PyTorch's fused one (sdpa)
            for att in ref $([ "$dt" = bf16 ] && echo sdpa); do
                out=$(timeout "$bench_limit" python3 tests/bench/torch_step.py --config "$d/config.yaml" --device cuda \
                    --dtype "$dt" --attention "$att" --steps "$steps" --json 2>&1 | tail -1)
                echo "$out" >>"$jsonl"
                rows+=("torch $spec $dt|$out")
            done
        done
    else
        rows+=("torch $spec|skipped: no config (are data/tokens/vocab8192/*.bin here?)")
    fi
done

# a kernel-level view of one Sigma-width layer at 2 x 4096 under Nsight Compute where it works (Firecracker
# machines; clocks left alone): per kernel its duration, throughput as % of the memory and compute peaks,
# occupancy. MOELAB_GPU_NCU=0 skips it; MOELAB_GPU_NCU_TIMEOUT seconds (default 200: the whole script must
# fit a 10-minute device call; the summary is printed only at the end, so at most 150 kernels, about a step).
ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
ncu_rc=skipped
if [ "${MOELAB_GPU_NCU:-1}" != 0 ] && [ -n "$ncu_bin" ]; then
    timeout "${MOELAB_GPU_NCU_TIMEOUT:-200}" "$ncu_bin" --clock-control none --print-summary per-kernel --launch-count 150 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        "$moelab" bench preset=sigma-tiny-full "${common[@]}" model.layers=1 train.batch=2 --backend cuda \
        --steps 1 --warmup 0 --no-peak >"$logs/moelab_gpu_ncu.txt" 2>&1
    ncu_rc=$?
fi

echo
echo "| test / preset | result |"
echo "|---|---|"
case $ops_rc in
0) echo "| gpu_ops | $(tail -1 "$logs/moelab_gpu_ops.txt") |" ;;
77) echo "| gpu_ops | $(head -1 "$logs/moelab_gpu_ops.txt") |" ;;
124) echo "| gpu_ops | TIMED OUT after ${ops_limit} s |" ;;
*) echo "| gpu_ops | FAILED (exit $ops_rc): $(grep -c '^FAIL' "$logs/moelab_gpu_ops.txt") failures |" ;;
esac
printf '%s\n' "${rows[@]}" | python3 tests/gpu/summary.py
echo "| ncu (1 Sigma-width layer, 2 x 4096) | ${ncu_bin:-no ncu}: exit $ncu_rc, per-kernel summary in $logs/moelab_gpu_ncu.txt |"
rm -rf "$tmp"
[ "$ops_rc" -eq 0 ]
