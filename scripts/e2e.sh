#!/usr/bin/env bash
# End-to-end tests against the real `moeserve serve`:
#  - the official openai and anthropic Python SDKs (tests/e2e/sdk_test.py);
#  - headless Chromium driving the chat page at `/` (tests/e2e/page_test.py), screenshot saved
#    to target/e2e-artifacts/chat-page.png.
# Python packages go into a venv under target/ (from PyPI); Chromium is Debian's package.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/e2e-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, anthropic, websocket" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40" "anthropic>=0.40" "websocket-client>=1.6"
fi
if ! command -v chromium >/dev/null; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
cargo build --quiet -p moeserve
bin="${CARGO_TARGET_DIR:-target}/debug/moeserve"
"$venv/bin/python" tests/e2e/sdk_test.py "$bin"
"$venv/bin/python" tests/e2e/page_test.py "$bin" target/e2e-artifacts/chat-page.png
