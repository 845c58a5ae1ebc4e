#!/usr/bin/env bash
# tests/gpu/run.sh: on a GPU machine, builds moelab with the CUDA backend, runs the gpu test suite (every op
# against the CPU, whole steps, bf16 against fp32 over 50 steps, determinism), then for each preset the GPU
# benchmark in bf16 (--backend cuda) and fp32 (cuda-fp32) beside the same model and step in PyTorch eager
# (bf16 autocast and fp32), and prints one summary table with the moelab / PyTorch ratios.
#   tests/gpu/run.sh [PRESET[:key=value,...] ...]
# default: tiny small-cpu gpu-small, then the full Sigma-MoE-Tiny width at 4 layers and 4K tokens per sequence
# (sigma-tiny-full:model.layers=4,train.batch=2); the PyTorch side runs only where the reference model covers
# the config. Needs: nvcc (or a build folder made elsewhere with -Dcuda=enabled), the NVIDIA driver, and the
# libraries the binary links (OpenBLAS, HDF5, SQLite, libyaml, pcre2; LD_LIBRARY_PATH may point at copies).
# The full bench JSON lines (per-op breakdown included) are kept in $OUT or /tmp/moelab_gpu_bench.jsonl.
# MOELAB_PREBUILT=DIR: take DIR/bin/moelab and DIR/bin/test_gpu_ops (tests/gpu/pack.sh) instead of building;
# the CUDA runtime and cuBLAS then come from /usr/local/cuda/lib64 or PyTorch's nvidia packages.
set -uo pipefail
cd "$(dirname "$0")/../.."
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(tiny small-cpu gpu-small "sigma-tiny-full:model.layers=4,train.batch=2")
if [ -n "${MOELAB_PREBUILT:-}" ]; then
    moelab=$MOELAB_PREBUILT/bin/moelab gpu_ops=$MOELAB_PREBUILT/bin/test_gpu_ops
    nv=$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null)
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64${nv:+:$nv}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
    moelab=build/moelab gpu_ops=build/tests/test_gpu_ops
    if [ ! -f build/build.ninja ]; then meson setup build -Dcuda=enabled || exit 2; fi
    ninja -C build || exit 2
fi
jsonl=${OUT:-/tmp}/moelab_gpu_bench.jsonl
: >"$jsonl"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
"$gpu_ops" | tee /tmp/moelab_gpu_ops.txt
ops_rc=${PIPESTATUS[0]}

# vocabulary 8192 everywhere, so that both sides read the same config (written by a zero-step moelab train,
# which needs the token shards of data/tokens/vocab8192: carry them or run moelab data prepare)
common=(model.vocab=8192 data.dir=data/tokens/vocab8192)
tmp=$(mktemp -d)
rows=()
for spec in "${presets[@]}"; do
    p=${spec%%:*} extra=()
    [[ $spec == *:* ]] && IFS=, read -ra extra <<<"${spec#*:}"
    for be in cuda cuda-fp32; do
        out=$("$moelab" bench "preset=$p" "${common[@]}" "${extra[@]}" --backend $be --steps 10 --json 2>&1 | tail -1)
        echo "$out" >>"$jsonl"
        rows+=("$spec $be|$out")
    done
    if "$moelab" train "preset=$p" "${common[@]}" "${extra[@]}" train.steps=0 run.dir="$tmp/$p" run.db= >/dev/null 2>&1; then
        for dt in bf16 fp32; do
            out=$(python3 tests/bench/torch_step.py --config "$tmp/$p/config.yaml" --device cuda --dtype $dt --steps 10 --json 2>&1 | tail -1)
            echo "$out" >>"$jsonl"
            rows+=("torch $spec $dt|$out")
        done
    else
        rows+=("torch $spec|skipped: no config (are data/tokens/vocab8192/*.bin here?)")
    fi
done

echo
echo "| test / preset | result |"
echo "|---|---|"
case $ops_rc in
0) echo "| gpu_ops | $(tail -1 /tmp/moelab_gpu_ops.txt) |" ;;
77) echo "| gpu_ops | $(head -1 /tmp/moelab_gpu_ops.txt) |" ;;
*) echo "| gpu_ops | FAILED (exit $ops_rc): $(grep -c '^FAIL' /tmp/moelab_gpu_ops.txt) failures |" ;;
esac
printf '%s\n' "${rows[@]}" | python3 tests/gpu/summary.py
rm -rf "$tmp"
[ "$ops_rc" -eq 0 ]
