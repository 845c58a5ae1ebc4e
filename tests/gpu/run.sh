#!/usr/bin/env bash
# tests/gpu/run.sh: on a GPU machine, builds moelab with the CUDA backend, runs the gpu test suite (every op
# against the CPU, a whole fp32 step, determinism) and the GPU benchmark, and prints one summary table.
#   tests/gpu/run.sh [PRESET ...]      default presets: tiny small-cpu gpu-small (gpu-small on random tokens)
# Needs: nvcc (or a build folder made elsewhere with -Dcuda=enabled), the NVIDIA driver, and the libraries the
# binary links (OpenBLAS, HDF5, SQLite, libyaml, pcre2; LD_LIBRARY_PATH may point at copies).
set -uo pipefail
cd "$(dirname "$0")/../.."
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(tiny small-cpu gpu-small)
if [ ! -f build/build.ninja ]; then meson setup build -Dcuda=enabled || exit 2; fi
ninja -C build || exit 2

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
build/tests/test_gpu_ops | tee /tmp/moelab_gpu_ops.txt
ops_rc=${PIPESTATUS[0]}

# vocabulary 8192 everywhere, so that both sides read the same config (written by a zero-step moelab train,
# which needs the token shards of data/tokens/vocab8192: carry them or run moelab data prepare)
common=(model.vocab=8192 data.dir=data/tokens/vocab8192)
tmp=$(mktemp -d)
rows=()
for p in "${presets[@]}"; do
    out=$(build/moelab bench "preset=$p" "${common[@]}" --backend cuda --steps 10 --json 2>&1 | tail -1)
    rows+=("$p|$out")
    if build/moelab train "preset=$p" "${common[@]}" train.steps=0 run.dir="$tmp/$p" run.db= >/dev/null 2>&1; then
        out=$(python3 tests/bench/torch_step.py --config "$tmp/$p/config.yaml" --device cuda --steps 10 --json 2>&1 | tail -1)
    else
        out="skipped: no config (are data/tokens/vocab8192/*.bin here?)"
    fi
    rows+=("torch $p|$out")
done

echo
echo "| test / preset | result |"
echo "|---|---|"
case $ops_rc in
0) echo "| gpu_ops | $(tail -1 /tmp/moelab_gpu_ops.txt) |" ;;
77) echo "| gpu_ops | $(head -1 /tmp/moelab_gpu_ops.txt) |" ;;
*) echo "| gpu_ops | FAILED (exit $ops_rc): $(grep -c '^FAIL' /tmp/moelab_gpu_ops.txt) failures |" ;;
esac
for r in "${rows[@]}"; do
    p=${r%%|*} j=${r#*|}
    if [[ $j == \{* ]]; then
        /usr/bin/python3 - "$p" "$j" <<'PY'
import json, sys
p, j = sys.argv[1], json.loads(sys.argv[2])
if "impl" in j:
    print(f"| PyTorch eager {p.split()[-1]} ({j['device']}) | {j['tokens_per_s']:.0f} tok/s, {j['ms_per_step']:.1f} ms/step |")
else:
    print(f"| bench {p} | {j['tokens_per_s']:.0f} tok/s, {j['ms_per_step']:.1f} ms/step, {j['gflops']:.0f} GFLOP/s = "
          f"{100 * j['fraction_of_peak']:.1f}% of the fp32 cuBLAS peak ({j['sgemm_peak_gflops']:.0f}), routing "
          f"{100 * j['routing_fraction']:.1f}%, tracing {100 * j['trace_fraction']:.2f}% |")
PY
    else
        echo "| $p | FAILED or skipped: $j |"
    fi
done
rm -rf "$tmp"
[ "$ops_rc" -eq 0 ]
