//! Hugging Face Hub model resolution: `ORG/NAME[@REVISION]` -> a local snapshot directory.
//!
//! Files land in the standard Hub cache (`$HF_HUB_CACHE`, default `$HF_HOME/hub`), laid out exactly
//! as Python's `huggingface_hub` and the `hf-hub` crate do, so all three share one copy:
//!
//! ```text
//! models--ORG--NAME/blobs/<etag>                      file contents, named by their etag (sha256 for LFS)
//! models--ORG--NAME/snapshots/<commit>/<file>         symlink -> ../../blobs/<etag>
//! models--ORG--NAME/refs/<revision>                   the commit hash the revision resolved to
//! models--ORG--NAME/.no_exist/<commit>/<file>         marker: the repo has no such (optional) file
//! ```
//!
//! Only the files inference needs are fetched: config, generation config, tokenizer, the safetensors
//! index and the shards it names (or a single `model.safetensors`). Downloads resume from a
//! `blobs/<etag>.incomplete` file with an HTTP Range request and are verified against the etag
//! (sha256 for LFS files, the git blob sha1 otherwise) before they enter the cache.
//!
//! The `hf-hub` crate was considered: its sync API resumes but verifies no checksum and reports
//! progress per file only, so the download layer is ours, on the same cache layout.

mod cache;
mod download;
mod progress;

use std::path::{Path, PathBuf};

use cache::RepoCache;
use moeserve_core::{Error, Result};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files fetched next to the weights when the repo has them.
pub const OPTIONAL_FILES: [&str; 3] = ["generation_config.json", "tokenizer.json", "tokenizer_config.json"];
pub const CONFIG: &str = "config.json";
pub const INDEX: &str = "model.safetensors.index.json";
pub const SINGLE_WEIGHTS: &str = "model.safetensors";

/// Where and how to reach the Hub. Tests build it directly; the CLI uses [`HubOptions::from_env`].
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Base URL, without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache root holding `models--ORG--NAME` folders (`HF_HUB_CACHE`).
    pub cache_dir: PathBuf,
    /// Bearer token for gated or private repos (`HF_TOKEN`, or the token file).
    pub token: Option<String>,
    /// Cache only, never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// No progress output at all (`MOESERVE_QUIET`).
    pub quiet: bool,
    /// Files downloaded at the same time.
    pub parallel: usize,
    /// Attempts per file when a transfer is interrupted (each resumes where the last one stopped).
    pub attempts: u32,
}

impl HubOptions {
    /// Defaults for a given cache root: the public Hub, online, no token.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            endpoint: DEFAULT_ENDPOINT.into(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            quiet: false,
            parallel: 4,
            attempts: 5,
        }
    }

    /// The Hub's own environment variables, read the way `huggingface_hub` reads them.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            cache.join("huggingface")
        });
        let cache_dir =
            var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
            std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let mut opts = HubOptions::new(cache_dir);
        opts.endpoint = var("HF_ENDPOINT").map_or(DEFAULT_ENDPOINT.into(), |e| e.trim_end_matches('/').to_string());
        opts.token = token.map(|t| t.trim().to_string());
        opts.offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v));
        opts.quiet =
            std::env::var_os("MOESERVE_QUIET").is_some() || var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_truthy(&v));
        opts
    }
}

fn is_truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
}

/// `ORG/NAME[@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    pub repo_id: String,
    pub revision: String,
}

impl RepoSpec {
    /// `None` unless `s` looks like a Hub model id: exactly one `/` between two non-empty names of
    /// letters, digits, `-`, `_`, `.` (not starting with `.`), an optional non-empty `@revision`.
    pub fn parse(s: &str) -> Option<RepoSpec> {
        let (id, revision) = match s.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (s, "main"),
        };
        if revision.is_empty() || revision.chars().any(char::is_whitespace) || revision.contains("..") {
            return None;
        }
        let (org, name) = id.split_once('/')?;
        let valid = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.len() <= 96
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (valid(org) && valid(name)).then(|| RepoSpec { repo_id: id.to_string(), revision: revision.to_string() })
    }

    /// How errors name the repo: `ORG/NAME`, with `@REVISION` unless it is `main`.
    pub fn label(&self) -> String {
        match self.revision.as_str() {
            "main" => self.repo_id.clone(),
            rev => format!("{}@{rev}", self.repo_id),
        }
    }
}

/// Resolve `--model`: an existing local path is returned as is; `ORG/NAME[@REV]` is found in the
/// cache or downloaded, and its snapshot directory returned.
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(repo) = RepoSpec::parse(spec) else {
        return Err(Error::Input(format!("--model {spec}: no such directory, and not a Hub model id (ORG/NAME[@REVISION])")));
    };
    snapshot(&repo, opts)
}

/// The snapshot directory of `repo`, complete with every file inference needs.
pub fn snapshot(repo: &RepoSpec, opts: &HubOptions) -> Result<PathBuf> {
    let cache = RepoCache::new(&opts.cache_dir, &repo.repo_id);
    // a complete snapshot for this revision: no network (pin @COMMIT to be explicit; delete refs/ to refresh)
    if let Some(commit) = cache.commit_for(&repo.revision) {
        match cache.missing_file(&commit, opts.offline) {
            Ok(None) => return Ok(cache.snapshot_dir(&commit)),
            Ok(Some(file)) if opts.offline => return Err(offline_error(repo, &cache, &file)),
            Err(e) if opts.offline => return Err(e),
            // incomplete or unreadable: fetch what is missing
            _ => {}
        }
    }
    if opts.offline {
        return Err(offline_error(repo, &cache, CONFIG));
    }
    download::fetch_snapshot(repo, &cache, opts)
}

fn offline_error(repo: &RepoSpec, cache: &RepoCache, file: &str) -> Error {
    Error::Hub {
        repo: repo.label(),
        file: file.to_string(),
        msg: format!(
            "not in the cache at {} and HF_HUB_OFFLINE is set; download it once online, or unset HF_HUB_OFFLINE",
            cache.root().display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_ids_and_rejects_paths() {
        let r = RepoSpec::parse("deepseek-ai/DeepSeek-R1-0528").unwrap();
        assert_eq!((r.repo_id.as_str(), r.revision.as_str()), ("deepseek-ai/DeepSeek-R1-0528", "main"));
        let r = RepoSpec::parse("org/name@v1.0").unwrap();
        assert_eq!(r.revision, "v1.0");
        assert_eq!(RepoSpec::parse("org/name@refs/pr/3").unwrap().revision, "refs/pr/3");
        for bad in ["name", "/abs/path", "./rel/x", "a/b/c", "org/", "/name", "org/name@", "../x", "~/models", "org/na me"] {
            assert!(RepoSpec::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn truthy_values() {
        assert!(is_truthy("1") && is_truthy("ON") && is_truthy("true"));
        assert!(!is_truthy("0") && !is_truthy("false"));
    }
}
