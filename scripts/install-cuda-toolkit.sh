#!/usr/bin/env bash
# Installs nvcc (Debian bookworm's `nvidia-cuda-toolkit`, CUDA 11.8) so that the `cuda` feature
# builds on a machine without a GPU (CI, developers), patchelf (`scripts/gpu-check.sh build`
# retargets the bundle's CUDA library names), and with `--with-nccl` libnccl (Debian has none;
# linking the `cuda` binaries needs it, as candle's cudarc links NCCL; `cargo check` does not),
# from NVIDIA's `nvidia-nccl-cu13` wheel on PyPI. Idempotent: does nothing when all exist.
# Needs root (apt-get). The GPU machine brings its own nvcc and does not run this.
set -euo pipefail
NCCL_DIR=/usr/lib/x86_64-linux-gnu
install_nccl() {
  [ "${1:-}" = --with-nccl ] || return 0
  [ -e "$NCCL_DIR/libnccl.so" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" nvidia-nccl-cu13
  (cd "$tmp" && python3 -m zipfile -e nvidia_nccl_cu13-*.whl x)
  cp "$(find "$tmp/x" -name libnccl.so.2 | head -n 1)" "$NCCL_DIR/libnccl.so.2"
  ln -sf libnccl.so.2 "$NCCL_DIR/libnccl.so"
  rm -rf "$tmp"
  echo "install-cuda-toolkit: libnccl.so.2 installed in $NCCL_DIR (for linking)"
}
if command -v nvcc >/dev/null 2>&1 && command -v patchelf >/dev/null 2>&1; then
  install_nccl "$@"
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
install_nccl "$@"
echo "install-cuda-toolkit: $(nvcc --version | tail -n 1 | sed 's/^ *//') installed"
