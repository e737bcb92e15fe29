#!/usr/bin/env python3
"""Headless Chromium drives the chat page at `/` over the DevTools protocol: it sends a message,
waits for the streamed reply to finish and saves a screenshot.
usage: page_test.py PATH_TO_MOESERVE_BINARY SCREENSHOT.png"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

import server as moeserve


def main():
    binary, shot = sys.argv[1], sys.argv[2]
    server, base = moeserve.start(binary)
    profile = tempfile.mkdtemp()
    chrome = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--remote-debugging-port=0",
                               "--window-size=900,600", "about:blank"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(400):
            try:
                # with port 0 Chromium writes the port it picked into the profile
                port = open(os.path.join(profile, "DevToolsActivePort")).read().split()[0]
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
                page = next(t for t in targets if t["type"] == "page")
                break
            except Exception:
                time.sleep(0.05)
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        ids = iter(range(1, 10**6))

        def call(method, **params):
            i = next(ids)
            ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == i:
                    return msg.get("result", {})

        def js(expr):
            return call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

        call("Page.navigate", url=base + "/")
        for _ in range(200):
            if js("document.readyState") == "complete" and js("!!document.getElementById('form')"):
                break
            time.sleep(0.05)
        js("document.getElementById('input').value = 'Hello'; document.getElementById('form').requestSubmit(); true")
        reply = None
        for _ in range(600):
            if js("!!document.querySelector('.assistant[data-done=\"true\"]')"):
                reply = js("document.querySelector('.assistant').innerText")
                break
            time.sleep(0.05)
        assert js("document.querySelector('.user').innerText") == "Hello", "the message was not shown"
        assert reply, "no finished streamed reply in the page"
        png = call("Page.captureScreenshot", format="png")["data"]
        os.makedirs(os.path.dirname(shot) or ".", exist_ok=True)
        with open(shot, "wb") as f:
            f.write(base64.b64decode(png))
        print(f"chat page: streamed reply {reply[:40]!r}, screenshot {shot}")
    finally:
        chrome.terminate()
        server.terminate()


if __name__ == "__main__":
    main()
