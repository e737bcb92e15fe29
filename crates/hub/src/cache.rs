//! The standard Hub cache layout for one model repo (shared with `huggingface_hub` and `hf-hub`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use moeserve_core::{Error, Result};

use crate::{CONFIG, INDEX, OPTIONAL_FILES, SINGLE_WEIGHTS};

pub struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo_id: &str) -> Self {
        RepoCache { root: cache_dir.join(format!("models--{}", repo_id.replace('/', "--"))) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    fn no_exist(&self, commit: &str, file: &str) -> PathBuf {
        self.root.join(".no_exist").join(commit).join(file)
    }

    /// The commit a revision points to: itself when it is a commit hash, else `refs/<revision>`.
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let commit = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let commit = commit.trim();
        is_commit_hash(commit).then(|| commit.to_string())
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        write_atomically(&path, commit.as_bytes())
    }

    /// Record that the repo has no `file` at `commit`, so later runs need not ask again.
    pub fn mark_missing(&self, commit: &str, file: &str) -> Result<()> {
        write_atomically(&self.no_exist(commit, file), b"")
    }

    /// Point `snapshots/<commit>/<file>` at `blobs/<etag>` (a relative symlink, as Python does).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<()> {
        let dst = self.snapshot_dir(commit).join(file);
        let parent = dst.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|source| Error::Io { path: parent.to_path_buf(), source })?;
        // `file` may sit in subfolders: one `..` per level, plus `snapshots/<commit>`
        let depth = Path::new(file).components().count() + 1;
        let target = Path::new(&"../".repeat(depth)).join("blobs").join(etag);
        let _ = std::fs::remove_file(&dst);
        symlink_or_copy(&target, &self.blob(etag), &dst).map_err(|source| Error::Io { path: dst, source })
    }

    /// The first file inference needs that `snapshots/<commit>` lacks; `None` when complete.
    /// Optional files count as present when a `.no_exist` marker says the repo has none; offline,
    /// whatever optional file is absent is simply skipped.
    pub fn missing_file(&self, commit: &str, offline: bool) -> Result<Option<String>> {
        let dir = self.snapshot_dir(commit);
        if !dir.join(CONFIG).is_file() {
            return Ok(Some(CONFIG.into()));
        }
        if !offline {
            if let Some(f) = OPTIONAL_FILES.iter().find(|f| !dir.join(f).is_file() && !self.no_exist(commit, f).exists()) {
                return Ok(Some(f.to_string()));
            }
        }
        let index = dir.join(INDEX);
        if !index.is_file() {
            return Ok((!dir.join(SINGLE_WEIGHTS).is_file()).then(|| SINGLE_WEIGHTS.to_string()));
        }
        let shards = shards_in_index(&index)?;
        Ok(shards.into_iter().find(|s| !dir.join(s).is_file()))
    }
}

/// The shard files a `model.safetensors.index.json` names, each once, sorted.
pub fn shards_in_index(index: &Path) -> Result<BTreeSet<String>> {
    let bad = |msg: String| Error::CheckpointFile { file: index.to_path_buf(), msg };
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io { path: index.to_path_buf(), source })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = BTreeSet::new();
    for v in map.values() {
        let name = v.as_str().ok_or_else(|| bad(format!("weight_map value {v} is not a file name")))?;
        // a shard name is a file inside the repo, never a way out of the snapshot
        if name.is_empty() || name.starts_with('/') || name.split('/').any(|p| p == ".." || p.is_empty()) {
            return Err(bad(format!("weight_map names an invalid shard file `{name}`")));
        }
        shards.insert(name.to_string());
    }
    if shards.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(shards)
}

pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Write via a temporary sibling and a rename: readers never see half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().map_or("file".into(), |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, _blob: &Path, dst: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, dst)
}

#[cfg(not(unix))]
fn symlink_or_copy(_target: &Path, blob: &Path, dst: &Path) -> std::io::Result<()> {
    // symlinks need privileges on Windows; Python falls back to copies too
    std::fs::copy(blob, dst).map(|_| ())
}
