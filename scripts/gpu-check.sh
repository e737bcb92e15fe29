#!/usr/bin/env bash
# The GPU check, in two halves (the GPU machine has nvcc and a driver but no Rust):
#
#   scripts/gpu-check.sh build   here: builds the `cuda` feature's GPU test binaries and the release
#                                `moeserve` into target/gpu-bundle/ (+ MANIFEST), ~250 MB stripped,
#                                and target/gpu-bundle.tar.xz (~35 MB) to carry
#   scripts/gpu-check.sh run     on the GPU machine, from the repo root, with target/gpu-bundle
#                                carried: binary starts -> every GPU parity test -> kernel benchmarks
#                                against the copy bandwidth and matmul rate measured in the same run ->
#                                synthetic checkpoint -> decode / prefill tok/s; prints a table
#
# The bundle is built with CUDA 11.8 (Debian's toolkit) and retargeted with patchelf to the GPU
# machine's CUDA major (GPU_CUDA_MAJOR, default 13): cuBLAS / cuBLASLt / NVRTC / cudart (candle's
# kernels library needs it) are looked up as
# lib*.so.$GPU_CUDA_MAJOR without symbol versions, the 11.x version requirements made weak
# (scripts/elf-weak-verneed.py; the loader warns about them and goes on); the driver API and
# cuRAND (libcurand.so.10 in CUDA 11-13) need nothing. Tested on a stub, not on a real CUDA 13. The
# embedded PTX is compute_$CUDA_COMPUTE_CAP (default 80), JIT-compiled by the driver; `run` also
# compiles kernels/src/*.cu to sm_90a cubins with the machine's nvcc when it has one and runs the
# parity tests a second time on those (MOESERVE_KERNELS_PTX_DIR).
#
# Environment: GPU_BUNDLE (default target/gpu-bundle), GPU_CUDA_MAJOR, CUDA_COMPUTE_CAP,
# GPU_SYNTH_PRESET (default gpu-r1-slice), GPU_SYNTH_DIR (default /tmp/moeserve-gpu-synth),
# GPU_BENCH_PROMPT / GPU_BENCH_GEN (default 512 / 64), GPU_TEST_TIMEOUT (seconds per test binary,
# default 300), GPU_CHECK_OUT (where the logs go; default a fresh temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-target/gpu-bundle}
MAJOR=${GPU_CUDA_MAJOR:-13}

die() {
  echo "gpu-check: $*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------
build() {
  set -e
  command -v nvcc >/dev/null || die "needs nvcc: run scripts/install-cuda-toolkit.sh"
  command -v patchelf >/dev/null || die "needs patchelf: run scripts/install-cuda-toolkit.sh"
  [ -e /usr/lib/x86_64-linux-gnu/libnccl.so ] || die "needs libnccl to link: run scripts/install-cuda-toolkit.sh --with-nccl"
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
  local t0=$SECONDS
  cargo build --release -p moeserve --features cuda
  local json
  json=$(mktemp)
  cargo test --release --features cuda -p moeserve-kernels -p moeserve-model -p moeserve-engine --no-run \
    --message-format=json >"$json"
  rm -rf "$BUNDLE"
  mkdir -p "$BUNDLE/bin" "$BUNDLE/tests"
  local target=${CARGO_TARGET_DIR:-target}
  cp "$target/release/moeserve" "$BUNDLE/bin/moeserve"
  # the GPU test targets (required-features = ["cuda"]): gpu_parity, gpu_model, gpu_engine
  python3 - "$json" "$BUNDLE/tests" <<'EOF'
import json, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"].startswith("gpu_"):
        shutil.copy(m["executable"], f"{dst}/{m['target']['name']}")
        print("bundled", m["target"]["name"])
EOF
  rm -f "$json"
  local n
  n=$(ls "$BUNDLE/tests" | wc -l)
  [ "$n" -ge 1 ] || die "no gpu_* test binaries were built"
  for b in "$BUNDLE"/bin/* "$BUNDLE"/tests/*; do
    strip "$b"
    retarget "$b"
  done
  {
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "nvcc: $(nvcc --version | tail -n 1)"
    echo "ptx: compute_${CUDA_COMPUTE_CAP}"
    echo "cuda libraries: lib*.so.${MAJOR} (GPU_CUDA_MAJOR)"
    (cd "$BUNDLE" && find bin tests -type f | sort | xargs sha256sum)
  } >"$BUNDLE/MANIFEST"
  cat "$BUNDLE/MANIFEST"
  du -sh "$BUNDLE"
  # the binaries embed candle's PTX as text: ~250 MB, ~35 MB compressed
  tar cf - -C "$(dirname "$BUNDLE")" "$(basename "$BUNDLE")" | xz -T0 -6 >"$BUNDLE.tar.xz"
  du -sh "$BUNDLE.tar.xz"
  echo "gpu-check build: done in $((SECONDS - t0)) s; carry $BUNDLE.tar.xz (or $BUNDLE) to the GPU machine and run: scripts/gpu-check.sh run"
}

# Point the CUDA 11.8 library references at the GPU machine's major version.
retarget() {
  local bin=$1 args=() lib sym
  [ "$MAJOR" = 11 ] && return 0
  for lib in libcublas.so.11 libcublasLt.so.11 libnvrtc.so.11.2 libcudart.so.11.0; do
    if patchelf --print-needed "$bin" | grep -qx "$lib"; then
      args+=(--replace-needed "$lib" "${lib%%.so.*}.so.${MAJOR}")
    fi
  done
  for sym in $(objdump -T "$bin" | awk '/\*UND\*/ && /(libcublas|libcublasLt|libnvrtc|libcudart)\.so\.[0-9]/ {print $NF}' | sort -u); do
    args+=(--clear-symbol-version "$sym")
  done
  [ ${#args[@]} -eq 0 ] || patchelf "${args[@]}" "$bin"
  # the version requirements (libcublas.so.11, ...) stay in .gnu.version_r: make them non-fatal
  python3 scripts/elf-weak-verneed.py "$bin" libcublas libnvrtc libcudart >/dev/null
}

# ---------------------------------------------------------------------------------------------
declare -a SUMMARY=()
note() {
  SUMMARY+=("$1|$2")
  printf '  -> %s: %s\n' "$1" "$2"
}

cuda_lib_path() {
  local d dirs=()
  for d in ${CUDA_HOME:+"$CUDA_HOME"} /usr/local/cuda /usr/local/cuda-* /opt/cuda \
    "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")"; do
    for sub in lib64 lib targets/x86_64-linux/lib; do
      [ -d "$d/$sub" ] && ls "$d/$sub"/libcublas.so.* >/dev/null 2>&1 && dirs+=("$d/$sub")
    done
  done
  # NCCL (and CUDA libraries the toolkit lacks) from the Python wheels of the machine's image
  local lib
  for lib in libnccl.so.2 libcublas.so.${MAJOR}; do
    d=$(find /opt /usr/local/lib /usr/lib/python3* -maxdepth 9 -name "$lib" -path '*nvidia*' 2>/dev/null | head -n 1)
    [ -n "$d" ] && dirs+=("$(dirname "$d")")
  done
  local IFS=:
  echo "${dirs[*]}"
}

run() {
  local t0=$SECONDS
  if [ ! -f "$BUNDLE/MANIFEST" ] && [ -f "$BUNDLE.tar.xz" ]; then
    tar xJf "$BUNDLE.tar.xz" -C "$(dirname "$BUNDLE")" || die "cannot unpack $BUNDLE.tar.xz"
  fi
  [ -f "$BUNDLE/MANIFEST" ] || die "no bundle at $BUNDLE: run 'scripts/gpu-check.sh build' on a machine with Rust and carry it"
  local moeserve="$BUNDLE/bin/moeserve" out
  out=${GPU_CHECK_OUT:-$(mktemp -d)}
  export LD_LIBRARY_PATH="$(cuda_lib_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export MOESERVE_REPO=$PWD
  echo "== bundle"
  head -n 4 "$BUNDLE/MANIFEST"
  echo "== device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(nvidia-smi unavailable)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1

  echo "== 1. the binary starts"
  if ! timeout 60 "$moeserve" --version; then
    echo "moeserve does not start; missing libraries:" >&2
    ldd "$moeserve" | grep -E "not found|cublas|nvrtc|curand|libcuda" >&2
    die "fix the library path (LD_LIBRARY_PATH) or rebuild the bundle with GPU_CUDA_MAJOR=<this machine's CUDA major>"
  fi
  note "binary starts" "ok"

  echo "== 2. GPU parity tests (embedded compute PTX)"
  local t ok=1
  for t in "$BUNDLE"/tests/*; do
    if timeout "${GPU_TEST_TIMEOUT:-300}" "$t" --test-threads=1 2>&1 | tee "$out/$(basename "$t").log" | grep -E "^test |relative error|panicked|test result"; then :; fi
    if grep -q "^test result: ok" "$out/$(basename "$t").log"; then
      note "$(basename "$t")" "$(grep '^test result' "$out/$(basename "$t").log" | sed 's/^test result: //')"
    else
      ok=0
      note "$(basename "$t")" "FAILED (log: $out/$(basename "$t").log)"
    fi
  done

  if command -v nvcc >/dev/null; then
    echo "== 2b. parity tests on sm_90a cubins from this machine's nvcc (MOESERVE_KERNELS_PTX_DIR)"
    local cub="$out/sm90a" f fail=0
    mkdir -p "$cub"
    for f in kernels/src/*.cu; do
      nvcc -arch=sm_90a --cubin -O3 -std=c++17 -I kernels/src -o "$cub/$(basename "${f%.cu}").cubin" "$f" || fail=1
    done
    if [ $fail -eq 0 ] && MOESERVE_KERNELS_PTX_DIR=$cub timeout "${GPU_TEST_TIMEOUT:-300}" "$BUNDLE/tests/gpu_parity" --test-threads=1 >"$out/sm90a.log" 2>&1; then
      note "gpu_parity on sm_90a cubins" "$(grep '^test result' "$out/sm90a.log" | sed 's/^test result: //')"
    else
      ok=0
      note "gpu_parity on sm_90a cubins" "FAILED (nvcc or tests; log: $out/sm90a.log)"
    fi
  fi

  echo "== 3. kernel benchmarks"
  if timeout 240 "$moeserve" bench --kernels --device cuda 2>&1 | tee "$out/kernels.txt"; then
    note "kernel bench" "see table above ($out/kernels.txt)"
  else
    ok=0
    note "kernel bench" "FAILED"
  fi

  echo "== 4. synthetic checkpoint and decode / prefill"
  local preset=${GPU_SYNTH_PRESET:-gpu-r1-slice} dir=${GPU_SYNTH_DIR:-/tmp/moeserve-gpu-synth}
  if [ ! -f "$dir/model.safetensors.index.json" ]; then
    rm -rf "$dir"
    timeout 240 "$moeserve" synth --preset "$preset" --out "$dir" --fp8 || { ok=0; note "synth $preset" "FAILED or too slow"; }
  fi
  if [ -f "$dir/model.safetensors.index.json" ]; then
    local p=${GPU_BENCH_PROMPT:-512} g=${GPU_BENCH_GEN:-64}
    if timeout 300 "$moeserve" bench --model "$dir" --device cuda --dtype bf16 --prompt-len "$p" --gen-len "$g" --runs 2 2>&1 |
      tee "$out/bench.txt"; then
      note "bench $preset (fp8, bf16 activations)" "$(grep -iE 'prefill|decode' "$out/bench.txt" | head -n 2 | tr -s ' ' | paste -sd ';' -)"
    else
      ok=0
      note "bench $preset" "FAILED"
    fi
  fi

  echo
  echo "== gpu-check summary ($((SECONDS - t0)) s; logs in $out)"
  local s
  for s in "${SUMMARY[@]}"; do
    printf '%-40s %s\n' "${s%%|*}" "${s#*|}"
  done
  [ -f "$out/kernels.txt" ] && grep -E "copy bandwidth|of floor|GB/s|TFLOP/s" "$out/kernels.txt"
  [ $ok -eq 1 ]
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) die "usage: scripts/gpu-check.sh build|run" ;;
esac
