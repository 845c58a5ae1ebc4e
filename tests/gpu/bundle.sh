#!/usr/bin/env bash
# tests/gpu/bundle.sh PREFIX [--without-cuda-libs]: a relocatable moelab: PREFIX/bin/moelab with DT_RPATH
# $ORIGIN/../lib, every shared library it needs except glibc's copied into PREFIX/lib, and plots/ and
# experiments/ in PREFIX/share/moelab (where moelab looks beside an installed binary). Copy PREFIX to a GPU node
# that has the NVIDIA driver but none of the -dev packages and run PREFIX/bin/moelab there.
# --without-cuda-libs leaves out libcudart and cuBLAS (about 600 MB): the node's CUDA 13 runtime must then be
# on LD_LIBRARY_PATH (e.g. the toolkit's lib64 or PyTorch's nvidia/*/lib folders).
# Needs patchelf (Debian: apt-get install patchelf) and a built build/moelab (MOELAB_BUILD=DIR: DIR/moelab).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
prefix=$1 without_cuda=0 b=${MOELAB_BUILD:-build}
[ "${2:-}" = "--without-cuda-libs" ] && without_cuda=1
command -v patchelf >/dev/null || { echo "bundle.sh: patchelf is missing (apt-get install patchelf)" >&2; exit 2; }
[ -x "$b/moelab" ] || { echo "bundle.sh: $b/moelab is missing (./setup.sh or ninja -C build)" >&2; exit 2; }

rm -rf "$prefix.partial"
mkdir -p "$prefix.partial/bin" "$prefix.partial/lib" "$prefix.partial/share/moelab"
cp "$b/moelab" "$prefix.partial/bin/"
cp -r plots experiments "$prefix.partial/share/moelab/"
# every resolved library but the C library's own (present on any Linux) and the kernel's vDSO
ldd "$b/moelab" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
    case "$soname" in
    libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | ld-linux*) continue ;;
    libcudart.so.* | libcublas.so.* | libcublasLt.so.*) [ $without_cuda -eq 1 ] && continue ;;
    esac
    cp -L "$path" "$prefix.partial/lib/$soname"
done
# DT_RPATH (not RUNPATH) so that the copied libraries' own dependencies are found there too
patchelf --force-rpath --set-rpath '$ORIGIN/../lib' "$prefix.partial/bin/moelab"
for lib in "$prefix.partial"/lib/*; do patchelf --force-rpath --set-rpath '$ORIGIN' "$lib"; done
rm -rf "$prefix"
mv "$prefix.partial" "$prefix"
echo "bundle: $prefix ($(du -sh "$prefix" | cut -f1)): bin/moelab, $(ls "$prefix/lib" | wc -l) libraries, share/moelab"
