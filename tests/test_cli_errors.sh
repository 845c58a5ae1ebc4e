#!/usr/bin/env bash
# test_cli_errors.sh: bad input reaches the user as a clear message naming the file or key, with exit code 2;
# --help works everywhere. $1 = the moelab binary, $2 = a prepared token folder (data/tokens/vocab8192).
set -u
moelab=$1
tokens=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

# expect CODE PATTERN -- ARGS...: runs moelab ARGS, checks its exit code and that stderr matches PATTERN
expect() {
    local code=$1 pattern=$2
    shift 3
    "$moelab" "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    if [ "$rc" -eq "$code" ] && grep -qE -- "$pattern" "$tmp/err" "$tmp/out"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL: moelab $* -> exit $rc (want $code), output:"; cat "$tmp/err" "$tmp/out" | head -5
        echo "      expected a line matching: $pattern"
    fi
}

[ -f "$tokens/train.bin" ] || { echo "FAIL: $tokens/train.bin missing: run 'moelab data prepare' first"; exit 1; }
small=(train.batch=2 model.seq_len=16 train.eval_batches=1 run.db="$tmp/runs.db")

# help
expect 0 "usage: moelab" -- --help
for cmd in train data bench plan; do expect 0 "usage: moelab $cmd" -- "$cmd" --help; done
expect 0 "model.experts" -- train --help-config
expect 2 "unknown command 'frobnicate'" -- frobnicate

# configs
expect 2 "model.top_k: k=9" -- train model.top_k=9
expect 2 "model.bogus: unknown key" -- train model.bogus=1
expect 2 "train.lr: 'fast' is not a finite number" -- train train.lr=fast
expect 2 "unknown option '--frob'" -- train --frob

# backends: an unknown name; the GPU tables where no GPU is usable (a GPU machine runs them instead)
expect 2 "--backend: 'tpu' is not cpu, cuda, cuda-fp32 or auto" -- train --backend tpu "${small[@]}" run.dir="$tmp/b0"
expect 2 "--backend: 'tpu' is not cpu, cuda, cuda-fp32 or auto" -- bench --backend tpu preset=tiny --steps 1
if ! nvidia-smi -L >/dev/null 2>&1; then
    for be in cuda cuda-fp32; do
        expect 2 "--backend $be: (no usable GPU|this moelab was built without the CUDA backend)" -- \
            bench --backend $be preset=tiny --steps 1
    done
    [ -e "$tmp/b0" ] && { failed=$((failed + 1)); echo "FAIL: a refused backend left a run folder"; }
else
    echo "note: a GPU is present: the no-GPU backend messages are not checked here (the gpu suite runs it)"
fi

# shards: missing, wrong magic, truncated, tokens outside the vocabulary
mkdir -p "$tmp/bad" "$tmp/short"
expect 2 "$tmp/none/train.bin" -- train "${small[@]}" data.dir="$tmp/none" run.dir="$tmp/r0"
head -c 4096 /dev/urandom >"$tmp/bad/train.bin"; cp "$tmp/bad/train.bin" "$tmp/bad/val.bin"
expect 2 "$tmp/bad/train.bin: .*magic" -- train "${small[@]}" data.dir="$tmp/bad" run.dir="$tmp/r1"
head -c 5000 "$tokens/train.bin" >"$tmp/short/train.bin"; cp "$tokens/val.bin" "$tmp/short/val.bin"
expect 2 "$tmp/short/train.bin" -- train "${small[@]}" data.dir="$tmp/short" run.dir="$tmp/r2"
expect 2 "$tokens/train.bin: token [0-9]+ at position [0-9]+ is outside model.vocab=100" -- \
    train "${small[@]}" model.vocab=100 data.dir="$tokens" run.dir="$tmp/r3"

# moelab plan: bad options, and a memory that cannot hold the model
expect 2 "--memory needs a size in GiB" -- plan preset=tiny --memory lots
expect 2 "--memory needs a size in GiB" -- plan preset=tiny --memory
expect 2 "--backend: 'tpu' is not cpu, cuda or cuda-fp32" -- plan preset=tiny --backend tpu
expect 2 "model.experts" -- plan preset=tiny model.experts=0
expect 0 "fits in 0.0 GiB  NO; the largest train.batch that fits: 0" -- plan preset=tiny --memory 0.001
expect 0 '"fits": true, "max_batch": [0-9]+' -- plan preset=tiny --memory 8 --json

# checkpoints: a good short run, then a corrupt and a foreign one
expect 0 "done: 2 steps" -- train "${small[@]}" train.steps=4 data.dir="$tokens" run.dir="$tmp/run" --stop-after 2
[ -f "$tmp/run/checkpoint.bin" ] || { failed=$((failed + 1)); echo "FAIL: no checkpoint written"; }
cp -r "$tmp/run" "$tmp/corrupt"
size=$(stat -c %s "$tmp/corrupt/checkpoint.bin")
printf '\xff\xfe' | dd of="$tmp/corrupt/checkpoint.bin" bs=1 seek=$((size / 2)) conv=notrunc 2>/dev/null
expect 2 "checkpoint.bin: checkpoint is corrupt" -- train --resume "$tmp/corrupt"
cp -r "$tmp/run" "$tmp/foreign"
echo "not a checkpoint" >"$tmp/foreign/checkpoint.bin"
expect 2 "checkpoint.bin: not a moelab checkpoint" -- train --resume "$tmp/foreign"
expect 2 "checkpoint model differs: checkpoint has 'model.dim: 64', config has 'model.dim: 32'" -- \
    train "${small[@]}" model.dim=32 data.dir="$tokens" run.dir="$tmp/r4" run.resume="$tmp/run/checkpoint.bin"
expect 0 "done: 4 steps" -- train --resume "$tmp/run"

echo "cli_errors: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
