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
set -uo pipefail
cd "$(dirname "$0")/../.."
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(tiny small-cpu gpu-small "sigma-tiny-full:model.layers=4,train.batch=2")
if [ ! -f build/build.ninja ]; then meson setup build -Dcuda=enabled || exit 2; fi
ninja -C build || exit 2
jsonl=${OUT:-/tmp}/moelab_gpu_bench.jsonl
: >"$jsonl"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
build/tests/test_gpu_ops | tee /tmp/moelab_gpu_ops.txt
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
        out=$(build/moelab bench "preset=$p" "${common[@]}" "${extra[@]}" --backend $be --steps 10 --json 2>&1 | tail -1)
        echo "$out" >>"$jsonl"
        rows+=("$spec $be|$out")
    done
    if build/moelab train "preset=$p" "${common[@]}" "${extra[@]}" train.steps=0 run.dir="$tmp/$p" run.db= >/dev/null 2>&1; then
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
printf '%s\n' "${rows[@]}" | /usr/bin/python3 -c '
import json, sys
moelab = {}
for line in sys.stdin:
    label, _, j = line.rstrip("\n").partition("|")
    try:
        r = json.loads(j)
    except ValueError:
        print(f"| {label} | FAILED or skipped: {j[:200]} |")
        continue
    if "impl" in r:
        spec, dt = label.split()[1], label.split()[2]
        mine = moelab.get((spec, "cuda" if dt == "bf16" else "cuda-fp32"))
        ratio = f", moelab is {mine / r[\"tokens_per_s\"]:.2f}x" if mine else ""
        print(f"| PyTorch eager {spec} {dt} | {r[\"tokens_per_s\"]:.0f} tok/s, {r[\"ms_per_step\"]:.1f} ms/step{ratio} |")
    else:
        spec, be = label.split()
        moelab[(spec, be)] = r["tokens_per_s"]
        top = ", ".join(f"{k} {v[\"ms_per_step\"]:.1f}" for k, v in list(r.get("ops", {}).items())[:4])
        print(f"| bench {spec} {be} | {r[\"tokens_per_s\"]:.0f} tok/s, {r[\"ms_per_step\"]:.1f} ms/step, MFU "
              f"{100 * r[\"mfu\"]:.1f}% of {r[\"peak_kind\"]} ({r[\"peak_gflops\"]:.0f} GFLOP/s), routing "
              f"{100 * r[\"routing_fraction\"]:.1f}%, tracing {100 * r[\"trace_fraction\"]:.2f}%, "
              f"{r[\"step_allocations\"]} allocations in steps; slowest ops (ms): {top} |")
'
rm -rf "$tmp"
[ "$ops_rc" -eq 0 ]
