#!/usr/bin/env bash
# tests/gpu/pack.sh [OUT.tar.xz]: everything tests/gpu/run.sh needs on a GPU machine that has the NVIDIA driver
# and a CUDA 13 runtime but none of moelab's -dev packages (the lent device: nothing can be installed there),
# in one compressed file small enough to carry: moelab and the gpu test, built here with the CUDA backend,
# with every non-glibc, non-CUDA library they link (rpath $ORIGIN/../lib). Default OUT: .gpu/moelab-gpu.tar.xz
# (.gpu/ is ignored by git). On the GPU machine, from the repository root:
#   tar xJf .gpu/moelab-gpu.tar.xz -C /tmp && MOELAB_PREBUILT=/tmp/moelab-gpu tests/gpu/run.sh
# (carry data/tokens/vocab8192 too: the benchmark's configs read its vocabulary).
# Builds in build-pack/ (CUDA backend required; -Dnative=false: the GPU machine's processor may lack this one's
# instructions, e.g. AVX-512). Needs patchelf, xz, nvcc and the -dev packages ./setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.gpu/moelab-gpu.tar.xz}
b=build-pack
[ -f $b/build.ninja ] || meson setup $b -Dcuda=enabled -Dnative=false >/dev/null || exit 2
ninja -C $b moelab tests/test_gpu_ops >/dev/null
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
MOELAB_BUILD=$b tests/gpu/bundle.sh "$stage/moelab-gpu" --without-cuda-libs >/dev/null
cp $b/tests/test_gpu_ops "$stage/moelab-gpu/bin/"
ldd $b/tests/test_gpu_ops | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
    case "$soname" in
    libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | ld-linux* | libcudart.so.* | libcublas*) continue ;;
    esac
    [ -e "$stage/moelab-gpu/lib/$soname" ] || { cp -L "$path" "$stage/moelab-gpu/lib/$soname" &&
        patchelf --force-rpath --set-rpath '$ORIGIN' "$stage/moelab-gpu/lib/$soname"; }
done
patchelf --force-rpath --set-rpath '$ORIGIN/../lib' "$stage/moelab-gpu/bin/test_gpu_ops"
mkdir -p "$(dirname "$out")"
tar -C "$stage" -cJf "$out.partial" moelab-gpu
mv "$out.partial" "$out"
echo "pack: $out ($(du -h "$out" | cut -f1)): bin/moelab, bin/test_gpu_ops, $(ls "$stage/moelab-gpu/lib" | wc -l) libraries"
