#!/usr/bin/env bash
# test_bundle.sh: tests/gpu/bundle.sh makes a relocatable moelab: with an empty environment the bundled binary
# runs, every library it loads (but glibc's and CUDA's) comes from the bundle, and it finds its experiment files.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
check() { if eval "$1"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $2"; fi; }

"$root/tests/gpu/bundle.sh" "$tmp/b" --without-cuda-libs >/dev/null
check '[ -x "$tmp/b/bin/moelab" ] && [ -f "$tmp/b/share/moelab/plots/heatmap.gp" ]' "bundle layout"
mv "$tmp/b" "$tmp/moved"   # relocatable: nothing points at the old place
check 'env -i "$tmp/moved/bin/moelab" --version | grep -q "^moelab"' "runs with an empty environment after a move"
outside=$(env -i ldd "$tmp/moved/bin/moelab" | awk '$2 == "=>" {print $1, $3}' |
          grep -v -E "^(libc|libm|libdl|libpthread|librt)\.so|^libcu(dart|blas|blasLt)\.so" | grep -v -E "$tmp/moved/(bin/\.\./)?lib/" || true)
check '[ -z "$outside" ]' "every library from the bundle (outside: $outside)"
check 'env -i "$tmp/moved/bin/moelab" sweep "$tmp/moved/share/moelab/experiments/paper/tiny.yaml" --dry-run \
       --db "$tmp/none.db" | grep -q "10 runs"' "the bundled binary reads the bundled experiment files"
echo "bundle: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
