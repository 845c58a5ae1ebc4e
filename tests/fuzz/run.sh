#!/usr/bin/env bash
# run.sh: fuzz the experiment-file parser (core/experiment.c) with libFuzzer + ASan + UBSan.
#
#   tests/fuzz/run.sh [SECONDS]        fuzz for SECONDS (default 300); exits non-zero on a crash, leak,
#                                      timeout or sanitizer report and prints the path of the input that did it
#   tests/fuzz/run.sh --merge [SECONDS] the same, then merges what was found into tests/fuzz/corpus (only the
#                                      inputs that add coverage: the kept corpus stays small)
#   tests/fuzz/run.sh --replay         only replays tests/fuzz/corpus once with an ASan+UBSan build (no fuzzing)
#
# Builds into build/fuzz/. New inputs go to build/fuzz/new-corpus, crashing inputs to build/fuzz/crashes/.
# EXPERIMENT_C=path/to/experiment.c fuzzes a modified copy instead of core/experiment.c (to try a fix).
# Needs clang with libFuzzer (Debian: clang, libclang-rt-dev), libyaml-dev and libsqlite3-dev.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
out=build/fuzz
merge=0 replay=0 seconds=300
for arg in "$@"; do
    case "$arg" in
    --merge) merge=1 ;;
    --replay) replay=1 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *[!0-9]* | '') echo "run.sh: unexpected argument '$arg' (SECONDS, --merge or --replay)" >&2; exit 2 ;;
    *) seconds=$arg ;;
    esac
done

cc=${CC_FUZZ:-clang}
if ! command -v "$cc" >/dev/null 2>&1; then
    echo "run.sh: $cc not found; installing it: apt-get install -y clang libclang-rt-dev"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update
    $sudo apt-get install -y clang libclang-rt-dev
fi

sources=("${EXPERIMENT_C:-core/experiment.c}" core/config.c core/err.c core/rundb.c core/rng.c core/balance/*.c analysis/metrics.c)
flags=(-g -O1 -fno-omit-frame-pointer -fno-sanitize-recover=all -Icore -Ianalysis)
libs=(-lyaml -lsqlite3 -lm)
mkdir -p "$out" "$out/new-corpus" "$out/crashes"

if [ "$replay" = 1 ]; then
    echo "run.sh: building $out/fuzz_experiment_replay (ASan+UBSan, -DML_FUZZ_REPLAY)"
    "$cc" "${flags[@]}" -fsanitize=address,undefined -DML_FUZZ_REPLAY tests/fuzz/fuzz_experiment.c "${sources[@]}" \
        "${libs[@]}" -o "$out/fuzz_experiment_replay"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$out/fuzz_experiment_replay" tests/fuzz/corpus
    exit $?
fi

echo "run.sh: building $out/fuzz_experiment (libFuzzer+ASan+UBSan)"
"$cc" "${flags[@]}" -fsanitize=fuzzer,address,undefined tests/fuzz/fuzz_experiment.c "${sources[@]}" "${libs[@]}" \
    -o "$out/fuzz_experiment"

# a dictionary of the words experiment files are made of: YAML syntax, the sections and every config key
dict=$out/experiment.dict
{
    cat <<'WORDS'
"name:"
"description:"
"base:"
"sweep:"
"variants:"
"seeds:"
"cross: false"
"preset"
"seed"
"true"
"null"
"~"
"---"
"..."
"&a "
"*a"
"!!str "
"!!int "
"!!map"
"<<: "
"? "
": "
"- "
"{}"
"[]"
", "
"|"
">-"
"#"
"#="
"\x0a  "
"\x0a    "
"small-cpu"
"aux_loss+z_loss"
"loss_free"
"topk_schedule"
"layers"
"until_tokens"
"1e-3"
"[2]*2"
WORDS
    grep -o '^    {"[a-z0-9_.]*"' core/config.c | sed 's/^    {//'
} >"$dict"

log=$out/fuzz.log
echo "run.sh: fuzzing for ${seconds}s; log in $log, new inputs in $out/new-corpus, crashes in $out/crashes/"
set +e
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$out/fuzz_experiment" "$out/new-corpus" tests/fuzz/corpus -dict="$dict" -max_total_time="$seconds" \
    -max_len=4096 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$out/crashes/" 2>&1 |
    tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "run.sh: the fuzzer stopped with status $status; the input that did it:" >&2
    grep -E 'Test unit written to|artifact_prefix' "$log" >&2 || ls -l "$out/crashes" >&2
    exit "$status"
fi
echo "run.sh: no crashes, leaks or timeouts in ${seconds}s ($(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$') inputs)"

if [ "$merge" = 1 ]; then
    before=$(ls tests/fuzz/corpus | wc -l)
    ASAN_OPTIONS=detect_leaks=1 "$out/fuzz_experiment" -merge=1 -max_len=4096 tests/fuzz/corpus "$out/new-corpus"
    echo "run.sh: tests/fuzz/corpus: $before -> $(ls tests/fuzz/corpus | wc -l) inputs"
fi
