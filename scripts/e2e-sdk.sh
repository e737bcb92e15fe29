#!/usr/bin/env bash
# End-to-end tests with the official openai and anthropic Python SDKs against `moeserve serve`.
# Creates a venv under target/ (pip from PyPI), builds the binary, runs tests/e2e/sdk_test.py.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/e2e-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40" "anthropic>=0.40"
fi
cargo build --quiet -p moeserve
"$venv/bin/python" tests/e2e/sdk_test.py "${CARGO_TARGET_DIR:-target}/debug/moeserve"
