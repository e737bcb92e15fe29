#!/usr/bin/env bash
# Installs nvcc (Debian bookworm's `nvidia-cuda-toolkit`, CUDA 11.8) so that the `cuda` feature
# builds on a machine without a GPU (CI, developers), and patchelf (`scripts/gpu-check.sh build`
# retargets the bundle's CUDA library names). Idempotent: does nothing when both exist.
# Needs root (apt-get). The GPU machine brings its own nvcc and does not run this.
set -euo pipefail
if command -v nvcc >/dev/null 2>&1 && command -v patchelf >/dev/null 2>&1; then
  echo "install-cuda-toolkit: $(nvcc --version | tail -n 1 | sed 's/^ *//') already installed"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ]; then
  # deb822 format: every `Components: main` line gets the non-free components.
  if grep -qE '^Components:' "$src" && ! grep -qE '^Components:.*non-free( |$)' "$src"; then
    sed -i -E 's/^Components:.*$/Components: main contrib non-free non-free-firmware/' "$src"
  fi
elif [ -f /etc/apt/sources.list ]; then
  if ! grep -qE '^deb .* non-free( |$)' /etc/apt/sources.list; then
    sed -i -E '/^deb /{/ non-free( |$)/! s/ main( |$)/ main contrib non-free non-free-firmware\1/}' /etc/apt/sources.list
  fi
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit patchelf >/dev/null
echo "install-cuda-toolkit: $(nvcc --version | tail -n 1 | sed 's/^ *//') installed"
