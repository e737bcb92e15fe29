"""Start `moeserve serve` on a free port for the end-to-end scripts and wait until it is healthy."""
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.request


def start(binary, *args):
    """Returns (process, base URL). The built-in tiny model runs from a private cache dir."""
    env = {**os.environ, "MOESERVE_CACHE": tempfile.mkdtemp(prefix="moeserve-e2e-")}
    p = subprocess.Popen([binary, "serve", "--port", "0", "--kv-cache-memory", "64MiB", *args],
                         stderr=subprocess.PIPE, text=True, env=env)
    base = None
    for line in p.stderr:
        m = re.match(r"listening on (http://\S+)", line)
        if m:
            base = m.group(1)
            break
    if not base:
        raise SystemExit("server did not start")
    # keep draining stderr so the server never blocks on it
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/health").status == 200:
                return p, base
        except Exception:
            time.sleep(0.05)
    p.terminate()
    raise SystemExit("server never became healthy")
