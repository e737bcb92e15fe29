//! Talking to the Hub: file metadata (HEAD), resumable verified downloads into the blob store,
//! and the snapshot they make up.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use moeserve_core::{Error, Result};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use ureq::config::RedirectAuthHeaders;
use ureq::http::{HeaderMap, Response};
use ureq::{Agent, Body};

use crate::cache::{self, RepoCache};
use crate::progress::{FileProgress, Progress};
use crate::{HubOptions, RepoSpec, CONFIG, INDEX, OPTIONAL_FILES, SINGLE_WEIGHTS};

const CHUNK: usize = 1 << 20;

/// What the Hub says about one file at one revision.
#[derive(Debug, Clone)]
struct Meta {
    commit: String,
    etag: String,
    size: Option<u64>,
}

/// Download every file `repo` needs that the cache lacks; link the snapshot; record the ref.
pub fn fetch_snapshot(repo: &RepoSpec, cache: &RepoCache, opts: &HubOptions) -> Result<PathBuf> {
    let client = Client::new(repo, opts);
    // config.json pins the commit: every later request names it, so all files come from one snapshot
    let config = client.head(&repo.revision, CONFIG)?.ok_or_else(|| client.not_found(CONFIG))?;
    let commit = config.commit.clone();
    let lookups: Vec<&str> = OPTIONAL_FILES.iter().copied().chain([INDEX]).collect();
    let found = parallel(&lookups, opts.parallel, |f| client.head(&commit, f))?;
    let mut small = vec![(CONFIG.to_string(), config)];
    let mut absent = Vec::new();
    for (file, meta) in lookups.iter().zip(found) {
        match meta {
            Some(m) => small.push((file.to_string(), m)),
            None => absent.push(*file),
        }
    }
    client.fetch_all(cache, &small, opts)?;

    let shards: Vec<String> = match small.iter().find(|(f, _)| f == INDEX) {
        Some((_, m)) => cache::shards_in_index(&cache.blob(&m.etag))?.into_iter().collect(),
        None => vec![SINGLE_WEIGHTS.to_string()],
    };
    let has_index = small.iter().any(|(f, _)| f == INDEX);
    let metas = parallel(&shards, opts.parallel, |f| client.head(&commit, f))?;
    let mut weights = Vec::with_capacity(shards.len());
    for (file, meta) in shards.into_iter().zip(metas) {
        let meta = meta.ok_or_else(|| match has_index {
            true => client.error(&file, format!("{INDEX} names this shard, but the repo has no such file (HTTP 404)")),
            false => client.error(&file, format!("the repo has neither {INDEX} nor {SINGLE_WEIGHTS} (HTTP 404)")),
        })?;
        weights.push((file, meta));
    }
    client.fetch_all(cache, &weights, opts)?;

    // only a fully verified download becomes visible in snapshots/ and refs/
    for (file, meta) in small.iter().chain(&weights) {
        cache.link(&commit, file, &meta.etag)?;
    }
    for file in absent {
        cache.mark_missing(&commit, file)?;
    }
    cache.write_ref(&repo.revision, &commit)?;
    Ok(cache.snapshot_dir(&commit))
}

/// Run `f` over `items` on up to `n` threads; results in order, the first error wins.
fn parallel<T: Sync, R: Send>(items: &[T], n: usize, f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let failed = AtomicBool::new(false);
    let next = Mutex::new(0usize);
    let results: Vec<Mutex<Option<Result<R>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..n.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = {
                    let Ok(mut next) = next.lock() else { return };
                    *next += 1;
                    *next - 1
                };
                if i >= items.len() || failed.load(Ordering::Relaxed) {
                    return;
                }
                let r = f(&items[i]);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(items.len());
    let mut first_err = None;
    for slot in results {
        match slot.into_inner().ok().flatten() {
            Some(Ok(r)) => out.push(r),
            Some(Err(e)) => {
                first_err.get_or_insert(e);
            }
            None => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None if out.len() == items.len() => Ok(out),
        None => Err(Error::Input("a download worker thread panicked".into())),
    }
}

struct Client {
    agent: Agent,
    endpoint: String,
    token: Option<String>,
    repo_id: String,
    label: String,
    attempts: u32,
}

/// Why one attempt failed: worth retrying (network, 5xx, a cut transfer) or final.
enum Failure {
    Retry(String),
    Fatal(Error),
}

impl Client {
    fn new(repo: &RepoSpec, opts: &HubOptions) -> Self {
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .redirect_auth_headers(RedirectAuthHeaders::SameHost)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // a stalled transfer fails and resumes, rather than hanging forever
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("moeserve/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            agent: Agent::new_with_config(config),
            endpoint: opts.endpoint.trim_end_matches('/').to_string(),
            token: opts.token.clone(),
            repo_id: repo.repo_id.clone(),
            label: repo.label(),
            attempts: opts.attempts.max(1),
        }
    }

    fn error(&self, file: &str, msg: impl Into<String>) -> Error {
        Error::Hub { repo: self.label.clone(), file: file.to_string(), msg: msg.into() }
    }

    fn not_found(&self, file: &str) -> Error {
        self.error(file, "the repo has no such file (HTTP 404)")
    }

    fn url(&self, revision: &str, file: &str) -> String {
        format!("{}/{}/resolve/{}/{}", self.endpoint, self.repo_id, encode(revision, false), encode(file, true))
    }

    fn backoff(attempt: u32) {
        std::thread::sleep(Duration::from_millis(200 << attempt.min(5)));
    }

    /// Metadata of `file` at `revision`; `None` when the repo has no such file.
    fn head(&self, revision: &str, file: &str) -> Result<Option<Meta>> {
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                Self::backoff(attempt);
            }
            match self.head_once(revision, file) {
                Ok(meta) => return Ok(meta),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(msg)) => last = msg,
            }
        }
        Err(self.error(file, format!("{last} (gave up after {} attempts)", self.attempts)))
    }

    fn head_once(&self, revision: &str, file: &str) -> std::result::Result<Option<Meta>, Failure> {
        let mut url = self.url(revision, file);
        // LFS files answer with a redirect to storage whose headers carry the metadata; a relative
        // redirect without metadata (a renamed repo) is followed
        for _ in 0..5 {
            let mut req = self.agent.head(&url).header("Accept-Encoding", "identity");
            if let Some(t) = &self.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let resp = req.config().max_redirects(0).build().call().map_err(|e| self.transport(&url, e))?;
            let status = resp.status().as_u16();
            let headers = resp.headers();
            if (300..400).contains(&status) && header(headers, "x-repo-commit").is_none() {
                match header(headers, "location") {
                    Some(loc) if loc.starts_with('/') => {
                        url = format!("{}{loc}", origin(&url));
                        continue;
                    }
                    _ => return Err(Failure::Fatal(self.error(file, format!("unexpected HTTP {status} redirect from {url}")))),
                }
            }
            if status >= 400 {
                return self.status_error(file, status, headers).map(|()| None);
            }
            let commit = header(headers, "x-repo-commit").ok_or_else(|| {
                Failure::Fatal(
                    self.error(file, format!("{url} sent no X-Repo-Commit header: is HF_ENDPOINT a Hugging Face Hub?")),
                )
            })?;
            let etag = header(headers, "x-linked-etag")
                .or_else(|| header(headers, "etag"))
                .map(normalize_etag)
                .filter(|e| !e.is_empty() && !e.contains(['/', '\\']))
                .ok_or_else(|| Failure::Fatal(self.error(file, format!("{url} sent no usable ETag header"))))?;
            let size = match header(headers, "x-linked-size") {
                Some(s) => s.parse().ok(),
                None if status < 300 => header(headers, "content-length").and_then(|s| s.parse().ok()),
                None => None,
            };
            return Ok(Some(Meta { commit: commit.to_string(), etag, size }));
        }
        Err(Failure::Fatal(self.error(file, format!("too many redirects from {url}"))))
    }

    fn transport(&self, url: &str, e: ureq::Error) -> Failure {
        Failure::Retry(format!("cannot reach {url}: {e}"))
    }

    /// Map a 4xx/5xx to an error naming the repo and file (`Ok(())` for a plain missing file).
    fn status_error(&self, file: &str, status: u16, headers: &HeaderMap) -> std::result::Result<(), Failure> {
        let code = header(headers, "x-error-code").unwrap_or("");
        let fatal = |msg: String| Err(Failure::Fatal(self.error(file, msg)));
        let token_hint = match self.token {
            Some(_) => "the token in HF_TOKEN does not grant access to it",
            None => "set HF_TOKEN (or HF_TOKEN_PATH) to a token with access",
        };
        match (status, code) {
            (_, "RepoNotFound") => {
                fatal(format!("repository not found (HTTP {status}); check the name; if it is private or gated, {token_hint}"))
            }
            (_, "RevisionNotFound") => fatal(format!("revision not found (HTTP {status})")),
            (_, "GatedRepo") => {
                fatal(format!("the repository is gated (HTTP {status}): accept its terms on the Hub, and {token_hint}"))
            }
            (401 | 403, _) => fatal(format!("access denied (HTTP {status}): {token_hint}")),
            (404, _) => Ok(()),
            (429 | 500..=599, _) => Err(Failure::Retry(format!("HTTP {status} from the Hub"))),
            _ => fatal(format!("unexpected HTTP {status}")),
        }
    }

    /// Download the blobs of `files` the cache lacks, with one progress display for all of them.
    fn fetch_all(&self, cache: &RepoCache, files: &[(String, Meta)], opts: &HubOptions) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        // identical files share one blob: fetch it once (two writers on one .incomplete would clash)
        let todo: Vec<&(String, Meta)> =
            files.iter().filter(|(_, m)| !cache.blob(&m.etag).is_file() && seen.insert(m.etag.as_str())).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let total = todo.iter().map(|(_, m)| m.size.unwrap_or(0)).sum();
        let progress = Progress::new(&self.label, todo.len(), total, opts.quiet);
        parallel(&todo, opts.parallel, |(file, meta)| self.fetch(cache, file, meta, &progress))?;
        progress.finish();
        Ok(())
    }

    /// Download one file into `blobs/<etag>`, resuming `blobs/<etag>.incomplete`, then verify it.
    fn fetch(&self, cache: &RepoCache, file: &str, meta: &Meta, progress: &Progress) -> Result<()> {
        let blob = cache.blob(&meta.etag);
        let part = cache.incomplete(&meta.etag);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        if let Some(dir) = part.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let mut bar = progress.file(file, meta.size.unwrap_or(0));
        let url = self.url(&meta.commit, file);
        let mut last = String::new();
        let mut complete = false;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                bar.note(&format!("{last}; resuming (attempt {} of {})", attempt + 1, self.attempts));
                Self::backoff(attempt);
            }
            match self.transfer(file, &url, &part, meta.size, &mut bar) {
                Ok(()) => {
                    complete = true;
                    break;
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(msg)) => last = msg,
            }
        }
        if !complete {
            return Err(self.error(file, format!("download failed: {last} (gave up after {} attempts)", self.attempts)));
        }
        if let Err(msg) = verify(&part, meta) {
            let _ = std::fs::remove_file(&part);
            return Err(self.error(file, format!("{msg}; the download was discarded")));
        }
        std::fs::rename(&part, &blob).map_err(io(&blob))
    }

    /// One GET of the rest of `part`: a Range request when part of the file is already there.
    fn transfer(
        &self,
        file: &str,
        url: &str,
        part: &Path,
        size: Option<u64>,
        bar: &mut FileProgress,
    ) -> std::result::Result<(), Failure> {
        let fatal = |e: std::io::Error| Failure::Fatal(Error::Io { path: part.to_path_buf(), source: e });
        let mut out = OpenOptions::new().create(true).append(true).open(part).map_err(fatal)?;
        let mut have = out.metadata().map_err(fatal)?.len();
        if size.is_some_and(|s| have > s) {
            out.set_len(0).map_err(fatal)?;
            have = 0;
        }
        bar.set(have);
        if size == Some(have) && have > 0 {
            return Ok(());
        }
        let mut req = self.agent.get(url).header("Accept-Encoding", "identity");
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let resp = req.call().map_err(|e| self.transport(url, e))?;
        let status = resp.status().as_u16();
        match status {
            206 if content_range_start(&resp) == Some(have) => {}
            // the server ignored the Range (or answered another one): start over
            200 | 206 | 416 => {
                out.set_len(0).map_err(fatal)?;
                bar.set(0);
                if status != 200 {
                    return Err(Failure::Retry(format!("HTTP {status} to a resume request")));
                }
            }
            _ => {
                self.status_error(file, status, resp.headers())?;
                return Err(Failure::Fatal(self.error(file, "the file vanished between HEAD and GET (HTTP 404)")));
            }
        }
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut pos = out.metadata().map_err(fatal)?.len();
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Retry(format!("transfer interrupted at {pos} bytes: {e}"))),
            };
            out.write_all(&buf[..n]).map_err(fatal)?;
            pos += n as u64;
            bar.set(pos);
            if size.is_some_and(|s| pos > s) {
                return Err(Failure::Retry(format!("the server sent more than the advertised {} bytes", size.unwrap_or(0))));
            }
        }
        out.flush().map_err(fatal)?;
        match size {
            Some(s) if pos < s => Err(Failure::Retry(format!("transfer cut short at {pos} of {s} bytes"))),
            _ => Ok(()),
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn content_range_start(resp: &Response<Body>) -> Option<u64> {
    // `bytes 100-999/1000`
    let v = header(resp.headers(), "content-range")?;
    v.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// `W/"abc"` -> `abc`.
fn normalize_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// Percent-encode a path segment (`keep_slash` for file paths inside the repo).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Check a finished download against its etag: sha256 for LFS files (64 hex digits), the git blob
/// sha1 for small files (40 hex digits); any other etag (a non-Hub server) gets a size check only.
fn verify(part: &Path, meta: &Meta) -> std::result::Result<(), String> {
    let len = std::fs::metadata(part).map_err(|e| format!("{}: {e}", part.display()))?.len();
    if let Some(size) = meta.size.filter(|s| *s != len) {
        return Err(format!("size mismatch: the Hub advertises {size} bytes, the download has {len}"));
    }
    let hex = meta.etag.len() == 64 || meta.etag.len() == 40;
    if !hex || !meta.etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let got = if meta.etag.len() == 64 {
        hash_file(part, Sha256::new())?
    } else {
        let mut h = Sha1::new();
        h.update(format!("blob {len}\0").as_bytes());
        hash_file(part, h)?
    };
    match got.eq_ignore_ascii_case(&meta.etag) {
        true => Ok(()),
        false => {
            let algo = if meta.etag.len() == 64 { "sha256" } else { "git sha1" };
            Err(format!("checksum mismatch: the Hub's etag is {algo} {}, the downloaded bytes hash to {got}", meta.etag))
        }
    }
}

fn hash_file<D: Digest>(path: &Path, mut hasher: D) -> std::result::Result<String, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_pieces() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("sub dir/a.json", true), "sub%20dir/a.json");
        assert_eq!(origin("http://127.0.0.1:80/a/b"), "http://127.0.0.1:80");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
    }

    #[test]
    fn git_blob_sha1_of_a_small_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `git hash-object` of "hello\n"
        let meta = Meta { commit: String::new(), etag: "ce013625030ba8dba906f756967f9e9ca394464a".into(), size: Some(6) };
        verify(&p, &meta).unwrap();
        let bad = Meta { etag: "ce013625030ba8dba906f756967f9e9ca394464b".into(), ..meta };
        assert!(verify(&p, &bad).unwrap_err().contains("checksum mismatch"));
    }
}
