#!/usr/bin/env bash
# test_data_cli.sh: runs `moelab data tokenize` on two small text files and checks the shards (llm.c magic,
# token counts, eot first), the idempotent second run, and the exit code 2 with a message naming the file
# for a missing input and bad usage. Usage: test_data_cli.sh MOELAB_BINARY [CACHE_DIR]  (default data/cache)
set -euo pipefail

bin="${1:?usage: test_data_cli.sh MOELAB_BINARY [CACHE_DIR]}"
cache="${2:-data/cache}"
ranks="$cache/gpt-tokenizer-4.0.0/package/data/r50k_base.tiktoken"
failures=0

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

if [[ ! -f "$ranks" ]]; then
    echo "FAIL: $ranks is missing: run \`moelab data prepare\` (or data/fetch.sh $cache) first"
    echo "test_data_cli: FAIL (cache missing)"
    exit 1
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/moelab_test_data_cli.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

printf 'The quick brown fox jumps over the lazy dog.\nIt was the best of times, it was the worst of times.\n' >"$tmp/a.txt"
printf 'Fellow-Citizens of the Senate and House of Representatives:\n\nI am happy to report progress. \xc3\xa9t\xc3\xa9\n' >"$tmp/b.txt"

# int32 at byte offset $2 of file $1
int32_at() { od -An -t d4 -j "$2" -N 4 "$1" | tr -d ' '; }
uint16_at() { od -An -t u2 -j "$2" -N 2 "$1" | tr -d ' '; }

out="$tmp/out"
if ! "$bin" data tokenize --tokenizer "$ranks" --vocab 8192 --out "$out" "$tmp/a.txt" "$tmp/b.txt" >"$tmp/log" 2>&1; then
    cat "$tmp/log"
    fail "data tokenize on two files failed"
fi
total=0
for shard in train val; do
    f="$out/$shard.bin"
    if [[ ! -f "$f" ]]; then
        fail "$f was not written"
        continue
    fi
    magic="$(int32_at "$f" 0)" version="$(int32_at "$f" 4)" count="$(int32_at "$f" 8)"
    size="$(stat -c %s "$f")"
    [[ "$magic" == 20240520 ]] || fail "$f: magic $magic, want 20240520 (llm.c version 1)"
    [[ "$version" == 1 ]] || fail "$f: version $version, want 1"
    [[ "$count" -gt 1 ]] || fail "$f: $count tokens, want more than the eot"
    [[ "$size" == $((1024 + 2 * count)) ]] || fail "$f: $size bytes for $count uint16 tokens"
    first="$(uint16_at "$f" 1024)"
    [[ "$first" == 8191 ]] || fail "$f: first token $first, want the eot 8191 before the document"
    total=$((total + count))
done
[[ -f "$out/meta.txt" ]] || fail "$out/meta.txt was not written"
grep -q '^vocab_size = 8192$' "$out/meta.txt" || fail "meta.txt lacks vocab_size = 8192"
grep -q '^eot = 8191$' "$out/meta.txt" || fail "meta.txt lacks eot = 8191"
grep -q '^train_docs = 1$' "$out/meta.txt" || fail "meta.txt: two files should split one and one"
for leftover in "$out"/*.tmp; do if [[ -e "$leftover" ]]; then fail "temporary file left behind: $leftover"; fi; done

# Same inputs again: nothing to do.
"$bin" data tokenize --cache "$cache" --out "$out" "$tmp/a.txt" "$tmp/b.txt" >"$tmp/log2" 2>&1 || fail "second run failed"
grep -q 'already prepared' "$tmp/log2" || { cat "$tmp/log2"; fail "second run with the same inputs should do nothing"; }

# A missing input: exit 2, and the message names the file.
set +e
"$bin" data tokenize --tokenizer "$ranks" --out "$tmp/out2" "$tmp/a.txt" "$tmp/missing.txt" >"$tmp/log3" 2>"$tmp/err3"
rc=$?
set -e
[[ $rc == 2 ]] || fail "missing input: exit $rc, want 2"
grep -q "$tmp/missing.txt" "$tmp/err3" || { cat "$tmp/err3"; fail "missing input: stderr does not name $tmp/missing.txt"; }
[[ ! -e "$tmp/out2/train.bin" ]] || fail "missing input: shards were written anyway"

expect_exit() {
    local want="$1" what="$2"
    shift 2
    set +e
    "$bin" "$@" >"$tmp/out.log" 2>"$tmp/err.log"
    local rc=$?
    set -e
    [[ $rc == "$want" ]] || { cat "$tmp/err.log"; fail "$what: exit $rc, want $want"; }
}
expect_exit 2 "no subcommand" data
expect_exit 2 "unknown subcommand" data frobnicate
expect_exit 2 "unknown option" data tokenize --frob "$tmp/a.txt"
expect_exit 2 "no input files" data tokenize --tokenizer "$ranks"
expect_exit 2 "vocab out of range" data tokenize --tokenizer "$ranks" --vocab 100 --out "$tmp/out3" "$tmp/a.txt"
expect_exit 2 "vocab not a number" data tokenize --vocab lots "$tmp/a.txt"
expect_exit 2 "missing rank file" data tokenize --tokenizer "$tmp/none.tiktoken" "$tmp/a.txt"
expect_exit 0 "data --help" data --help
expect_exit 0 "data tokenize --help" data tokenize --help
grep -q 'usage: moelab data tokenize' "$tmp/out.log" || fail "data tokenize --help prints no usage"
expect_exit 0 "data prepare --help" data prepare --help

if [[ $failures == 0 ]]; then
    echo "test_data_cli: PASS ($total tokens in two shards)"
else
    echo "test_data_cli: FAIL ($failures failed)"
    exit 1
fi
