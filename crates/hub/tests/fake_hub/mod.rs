//! A stand-in for the Hugging Face Hub on 127.0.0.1: serves one model repo through the Hub's URL
//! scheme (`/{repo}/resolve/{revision}/{file}`), with HEAD metadata headers, LFS redirects to a
//! `/cdn/<sha256>` path, Range requests, and switches to cut a transfer short or corrupt a file.
//! Shared by the hub crate's tests and the CLI end-to-end test (included by path).

// each test file uses a subset of these helpers
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::Sha1;
use sha2::{Digest, Sha256};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
pub struct Repo {
    pub id: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// revision names (branches, tags) -> commit; the commit itself always resolves
    pub revisions: BTreeMap<String, String>,
    /// answer 401 unless `Authorization: Bearer <token>`
    pub token: Option<String>,
    /// the next GET of these files sends half the body, then closes the connection
    pub cut_once: HashSet<String>,
    /// these files are served with one byte flipped (the advertised sha256 is the true one)
    pub corrupt: HashSet<String>,
}

impl Repo {
    pub fn new(id: &str) -> Self {
        let revisions = [("main".to_string(), COMMIT.to_string())].into();
        Repo { id: id.into(), revisions, ..Default::default() }
    }

    /// The tiny DeepSeek-V3 fixture (two shards + index) with the real tokenizer files.
    pub fn tiny_v3(id: &str) -> Self {
        // the workspace root, from whichever crate includes this file
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = here.ancestors().find(|p| p.join("tests/fixtures/tiny-v3").is_dir()).unwrap();
        let mut repo = Repo::new(id);
        let fixture = root.join("tests/fixtures/tiny-v3");
        for f in [
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            repo.files.insert(f.into(), std::fs::read(fixture.join(f)).unwrap());
        }
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            repo.files.insert(f.into(), std::fs::read(root.join("models/deepseek-v3").join(f)).unwrap());
        }
        // a file the model does not need: it must not be downloaded
        repo.files.insert("README.md".into(), b"# tiny\n".to_vec());
        repo
    }
}

pub fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors")
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

pub fn git_sha1_hex(b: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

pub struct FakeHub {
    pub endpoint: String,
    pub repo: Arc<Mutex<Repo>>,
    log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl FakeHub {
    pub fn start(repo: Repo) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let hub = FakeHub {
            endpoint,
            repo: Arc::new(Mutex::new(repo)),
            log: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (repo, log, stop) = (hub.repo.clone(), hub.log.clone(), hub.stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (repo, log) = (repo.clone(), log.clone());
                std::thread::spawn(move || serve_connection(stream, &repo, &log));
            }
        });
        hub
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // wake the accept loop so it sees the flag
        let _ = TcpStream::connect(self.endpoint.trim_start_matches("http://"));
    }
}

fn serve_connection(stream: TcpStream, repo: &Mutex<Repo>, log: &Mutex<Vec<Request>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    // keep-alive: one request after another on the same connection
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let (mut range, mut auth) = (None, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "range" => range = Some(v.trim().to_string()),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        log.lock().unwrap().push(Request {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            auth: auth.clone(),
        });
        let resp = respond(method == "HEAD", &path, range.as_deref(), auth.as_deref(), &mut repo.lock().unwrap());
        let mut head = format!("HTTP/1.1 {}\r\n", resp.status);
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", resp.content_length));
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        if method != "HEAD" {
            let body = match resp.cut {
                true => &resp.body[..resp.body.len() / 2],
                false => &resp.body[..],
            };
            if writer.write_all(body).is_err() {
                return;
            }
        }
        let _ = writer.flush();
        if resp.cut {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

struct Response {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    content_length: usize,
    cut: bool,
}

fn plain(status: &'static str, headers: Vec<(String, String)>) -> Response {
    let body = status.as_bytes().to_vec();
    Response { status, headers, content_length: body.len(), body, cut: false }
}

fn respond(head: bool, path: &str, range: Option<&str>, auth: Option<&str>, repo: &mut Repo) -> Response {
    let err = |code: &str| vec![("X-Error-Code".to_string(), code.to_string())];
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let Some((name, bytes)) = repo.files.iter().find(|(_, b)| sha256_hex(b) == sha).map(|(n, b)| (n.clone(), b.clone()))
        else {
            return plain("404 Not Found", vec![]);
        };
        return content(head, &name, bytes, range, repo, vec![]);
    }
    let Some(rest) = path.strip_prefix(&format!("/{}/resolve/", repo.id)) else {
        // the real Hub answers 401 for repos it will not admit exist
        return plain("401 Unauthorized", err("RepoNotFound"));
    };
    if let Some(token) = &repo.token {
        if auth != Some(format!("Bearer {token}").as_str()) {
            return plain("401 Unauthorized", vec![]);
        }
    }
    let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
    let rev = rev.replace("%2F", "/");
    let commit = match repo.revisions.get(&rev) {
        Some(c) => c.clone(),
        None if rev == COMMIT => rev.clone(),
        None => return plain("404 Not Found", err("RevisionNotFound")),
    };
    let Some(bytes) = repo.files.get(file).cloned() else {
        return plain("404 Not Found", err("EntryNotFound"));
    };
    let mut headers = vec![("X-Repo-Commit".to_string(), commit)];
    if is_lfs(file) {
        let sha = sha256_hex(&bytes);
        headers.push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
        headers.push(("X-Linked-Size".into(), bytes.len().to_string()));
        headers.push(("ETag".into(), "\"not-the-content-etag\"".into()));
        headers.push(("Location".into(), format!("/cdn/{sha}")));
        return plain("302 Found", headers);
    }
    headers.push(("ETag".into(), format!("\"{}\"", git_sha1_hex(&bytes))));
    content(head, file, bytes, range, repo, headers)
}

/// A file's bytes, honouring `Range: bytes=N-` and the cut/corrupt switches.
fn content(
    head: bool,
    name: &str,
    mut bytes: Vec<u8>,
    range: Option<&str>,
    repo: &mut Repo,
    mut headers: Vec<(String, String)>,
) -> Response {
    if repo.corrupt.contains(name) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let total = bytes.len();
    let mut status = "200 OK";
    if let Some(start) = range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-')) {
        let start: usize = start.parse().unwrap();
        if start >= total {
            return plain("416 Range Not Satisfiable", vec![]);
        }
        headers.push(("Content-Range".into(), format!("bytes {start}-{}/{total}", total - 1)));
        bytes.drain(..start);
        status = "206 Partial Content";
    }
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    let cut = !head && repo.cut_once.remove(name);
    Response { status, headers, content_length: bytes.len(), body: bytes, cut }
}
