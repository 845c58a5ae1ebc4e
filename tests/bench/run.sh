#!/usr/bin/env bash
# run.sh: moelab training throughput against a PyTorch eager baseline of the same model, same machine.
#
#   bash tests/bench/run.sh [PRESET] [STEPS] [key=value ...]      (defaults: small-cpu 10)
#
# Runs `build/moelab bench preset=PRESET key=value... --json --steps STEPS`, then tests/bench/torch_step.py
# on the config moelab resolves for the same preset and overrides (written by `moelab train ...
# train.steps=0`, which needs that preset's token shards: `moelab data prepare`, see data/README.md),
# twice: as installed, and tuned: glibc malloc told to keep freed memory (MALLOC_MMAP_MAX_=0,
# MALLOC_TRIM_THRESHOLD_ huge) so large tensors stop costing fresh page faults every step, and torch's BLAS
# switched to the OpenMP build of OpenBLAS that moelab links (LD_LIBRARY_PATH), so GEMM threads and torch's
# own OpenMP threads share one pool instead of oversubscribing the cores (see README.md). Prints a table.
# Every run uses every core, 2 warmup steps and STEPS timed steps on random tokens.
#
# Environment: MOELAB (default build/moelab), PYTHON (default /usr/bin/python3, Debian's python3-torch),
# TORCH_ARGS (extra torch_step.py flags, e.g. "--moe loop" or "--threads 1"), TUNED=0 (skip the tuned
# PyTorch run), OPENBLAS_OPENMP_DIR (default /usr/lib/*-linux-gnu/openblas-openmp), REPEAT=N (N interleaved
# rounds, each column reports its best round; default 1).
# Exit 2: moelab or torch missing, bad arguments, or a config the PyTorch model does not cover.
set -euo pipefail
cd "$(dirname "$0")/../.."

PRESET=${1:-small-cpu}
STEPS=${2:-10}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] && shift
EXTRA=("$@")
MOELAB=${MOELAB:-build/moelab}
PY=${PYTHON:-/usr/bin/python3}
read -r -a TORCH_EXTRA <<< "${TORCH_ARGS:-}"
REPEAT=${REPEAT:-1}

die() { echo "tests/bench/run.sh: $*" >&2; exit 2; }
[[ $STEPS =~ ^[1-9][0-9]*$ ]] || die "STEPS must be a positive integer, got '$STEPS' (usage: run.sh [PRESET] [STEPS] [key=value ...])"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer, got '$REPEAT'"
[ -x "$MOELAB" ] || die "$MOELAB not found or not executable; build it first: meson setup build && ninja -C build"
command -v "$PY" > /dev/null || die "$PY not found (set PYTHON=...)"
"$PY" -c 'import torch' 2> /dev/null ||
    die "torch is not importable by $PY; install Debian's python3-torch (apt-get install python3-torch) or set PYTHON=..."

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# the config moelab itself resolves (preset + overrides), as runs/<run>/config.yaml; zero steps, exits at once,
# and (run.db="", where this moelab has a run database) records nothing in runs.db
NODB=()
"$MOELAB" train --help-config 2> /dev/null | grep -q '^ *run\.db ' && NODB=(run.db=)
if ! "$MOELAB" train preset="$PRESET" "${EXTRA[@]+"${EXTRA[@]}"}" train.steps=0 run.dir="$TMP/run" \
        "${NODB[@]+"${NODB[@]}"}" > "$TMP/train.log" 2>&1; then
    cat "$TMP/train.log" >&2
    die "'moelab train preset=$PRESET train.steps=0' failed, so there is no config.yaml for the PyTorch side (bad preset/key, or the token shards of data.dir are not prepared: see data/README.md)"
fi

torch_step() {
    "$PY" tests/bench/torch_step.py --config "$TMP/run/config.yaml" --steps "$STEPS" --json \
        "${TORCH_EXTRA[@]+"${TORCH_EXTRA[@]}"}"
}
# the PyTorch side must cover this config and still be the reference model (its eager MoE against
# make_fixtures.moe in float64); both checks take a second or two
rc=0
"$PY" tests/bench/torch_step.py --check --config "$TMP/run/config.yaml" > "$TMP/check.log" 2>&1 || rc=$?
if [ $rc = 2 ]; then
    cat "$TMP/check.log" >&2
    exit 2
elif [ $rc != 0 ]; then
    cat "$TMP/check.log" >&2
    echo "tests/bench/run.sh: torch_step.py --check failed: its MoE no longer matches tests/reference/make_fixtures.py" >&2
    exit 1
fi

# REPEAT rounds, interleaved; each column keeps its best round (highest tokens/s): on a shared machine the
# best of a few runs is the least disturbed one
TUNED_ENV=(MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000)
TUNED_WHAT="malloc keeps freed memory"
OMPBLAS=${OPENBLAS_OPENMP_DIR:-}
if [ -z "$OMPBLAS" ]; then
    for d in /usr/lib/*-linux-gnu/openblas-openmp; do
        [ -d "$d" ] && OMPBLAS=$d && break
    done
fi
if [ -n "$OMPBLAS" ] && [ -e "$OMPBLAS/libblas.so.3" ]; then
    TUNED_ENV+=("LD_LIBRARY_PATH=$OMPBLAS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
    TUNED_WHAT+=", BLAS from $OMPBLAS"
else
    TUNED_WHAT+="; no OpenMP OpenBLAS found, BLAS as installed"
fi
: > "$TMP/moelab.jsonl"
: > "$TMP/torch.jsonl"
: > "$TMP/tuned.jsonl"
for ((r = 1; r <= REPEAT; r++)); do
    echo "[$r/$REPEAT] moelab bench preset=$PRESET --steps $STEPS ..." >&2
    "$MOELAB" bench preset="$PRESET" "${EXTRA[@]+"${EXTRA[@]}"}" --json --steps "$STEPS" >> "$TMP/moelab.jsonl"
    echo "[$r/$REPEAT] PyTorch eager, same config ..." >&2
    torch_step >> "$TMP/torch.jsonl"
    if [ "${TUNED:-1}" != 0 ]; then
        echo "[$r/$REPEAT] PyTorch eager, tuned ($TUNED_WHAT) ..." >&2
        env "${TUNED_ENV[@]}" "$PY" tests/bench/torch_step.py --config "$TMP/run/config.yaml" --steps "$STEPS" \
            --json "${TORCH_EXTRA[@]+"${TORCH_EXTRA[@]}"}" >> "$TMP/tuned.jsonl"
    fi
done

LOAD=$(cut -d' ' -f1-3 /proc/loadavg 2> /dev/null || echo unknown)
CPU=$(lscpu 2> /dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
"$PY" - "$TMP" "$REPEAT" "$(nproc)" "${CPU:-unknown CPU}" "$LOAD" "$TUNED_WHAT" <<'EOF'
import json, os, sys
tmp, repeat, nproc, cpu, load, tuned_what = sys.argv[1:7]
def best(name):
    runs = [json.loads(l) for l in open(os.path.join(tmp, name + ".jsonl")) if l.strip()]
    if not runs:
        return None, ""
    b = max(runs, key=lambda d: d["tokens_per_s"])
    return b, "/".join(f"{d['tokens_per_s']:.0f}" for d in runs)
(m, m_all), (t, t_all), (u, u_all) = best("moelab"), best("torch"), best("tuned")
peak = m["peak_gflops"]
cols = [("moelab", m), ("PyTorch", t)] + ([("PyTorch tuned", u)] if u else [])
print(f"preset {m['preset']}: {m['params']} parameters, {m['tokens_per_step']} tokens/step, {m['steps']} timed steps"
      f" after 2 warmup; {nproc} cores ({cpu}); PyTorch {t['torch']} eager, {t['moe']} MoE, {t['threads']} threads")
if int(repeat) > 1:
    print(f"best of {repeat} interleaved rounds; tokens/s of each round: moelab {m_all}, PyTorch {t_all}"
          + (f", PyTorch tuned {u_all}" if u else ""))
# speedup columns: how many times faster moelab is than each PyTorch run
# (rates: moelab/PyTorch; times: PyTorch/moelab)
rows = [("tokens/s", "tokens_per_s", "{:.0f}", 1), ("ms/step", "ms_per_step", "{:.1f}", -1),
        ("  forward ms", "forward_ms", "{:.1f}", -1), ("  backward ms", "backward_ms", "{:.1f}", -1),
        ("  optimizer ms", "optimizer_ms", "{:.1f}", -1), ("GFLOP/s", "gflops", "{:.2f}", 1)]
print(f"{'':24}" + "".join(f"{name:>16}" for name, _ in cols)
      + "".join(f"{'moelab/' + name:>22}" for name, _ in cols[1:]))
for label, key, fmt, sense in rows:
    line = f"{label:24}" + "".join(f"{fmt.format(d[key]):>16}" for _, d in cols)
    for _, d in cols[1:]:
        a, b = (m[key], d[key]) if sense > 0 else (d[key], m[key])
        line += f"{a / b if b else float('nan'):>21.2f}x"
    print(line)
print(f"{'fraction of sgemm peak':24}" + "".join(f"{100 * d['gflops'] / peak:>15.1f}%" for _, d in cols)
      + f"   (peak {peak:.1f} GFLOP/s: moelab's 2048^3 sgemm)")
print(f"tokens/s ratio moelab/PyTorch: {m['tokens_per_s'] / t['tokens_per_s']:.2f}"
      + (f"; moelab/PyTorch tuned: {m['tokens_per_s'] / u['tokens_per_s']:.2f}" if u else ""))
if u:
    print(f"PyTorch tuned: {tuned_what}")
print(f"load average after the runs: {load} (anything else busy on these cores skews every column)")
for name, d in cols:
    print(f"{name + ':':16}{json.dumps(d)}")
EOF
