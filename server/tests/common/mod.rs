//! Shared by the HTTP test files: run `moeserve serve` on a free port and wait until healthy.

// each test file uses a subset of these helpers
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Server {
    pub child: Child,
    pub base: String,
    _cache: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `moeserve serve --port 0 ARGS…` with a private cache dir; returns once /health is 200.
pub async fn start(args: &[&str]) -> Server {
    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_moeserve"))
        .args(["serve", "--port", "0"])
        .args(args)
        .env("MOESERVE_CACHE", cache.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(a) = line.strip_prefix("listening on ") {
                    break a.to_string();
                }
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server exited before listening");
            }
        }
    };
    // keep draining stderr so the server never blocks on it
    std::thread::spawn(move || for _ in lines {});
    let server = Server { child, base, _cache: cache };
    for _ in 0..600 {
        if reqwest::get(format!("{}/health", server.base)).await.is_ok_and(|r| r.status() == 200) {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server never became healthy");
}

/// POST `body` to `path` and return the raw SSE text of the response.
pub async fn post_stream_text(s: &Server, path: &str, body: &serde_json::Value) -> String {
    reqwest::Client::new().post(format!("{}{path}", s.base)).json(body).send().await.unwrap().text().await.unwrap()
}

/// The JSON payloads of an SSE body (the final `[DONE]` excluded).
pub fn sse_json(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// POST JSON to `path` and parse the JSON answer.
pub async fn post_json(s: &Server, path: &str, body: &serde_json::Value) -> serde_json::Value {
    reqwest::Client::new().post(format!("{}{path}", s.base)).json(body).send().await.unwrap().json().await.unwrap()
}
