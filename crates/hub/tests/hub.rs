//! Hub resolution against a local stand-in Hub: fresh download into the standard cache, cache hits
//! without network, resume after an interrupted transfer, checksum rejection, offline mode, and the
//! errors a user sees for a missing repo, file or token.

mod fake_hub;

use std::path::{Path, PathBuf};

use fake_hub::{sha256_hex, FakeHub, Repo, COMMIT};
use moeserve_hub::{resolve_model, HubOptions};

const REPO: &str = "tiny-org/tiny-v3";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

fn opts(cache: &Path, hub: &FakeHub) -> HubOptions {
    let mut o = HubOptions::new(cache);
    o.endpoint = hub.endpoint.clone();
    o
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("models--tiny-org--tiny-v3")
}

fn err_text(r: moeserve_core::Result<PathBuf>) -> String {
    match r {
        Ok(p) => panic!("expected an error, got {}", p.display()),
        Err(e) => e.to_string(),
    }
}

fn blobs(cache: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(repo_dir(cache).join("blobs")) else { return vec![] };
    rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn fresh_download_fills_the_standard_cache_and_the_second_call_stays_offline() {
    let hub = FakeHub::start(Repo::tiny_v3(REPO));
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve_model(REPO, &opts(cache.path(), &hub)).unwrap();
    assert_eq!(dir, repo_dir(cache.path()).join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo_dir(cache.path()).join("refs/main")).unwrap(), COMMIT);

    let files = hub.repo.lock().unwrap().files.clone();
    for (name, bytes) in &files {
        let path = dir.join(name);
        if name == "README.md" {
            assert!(!path.exists(), "files the model does not need are not downloaded");
            continue;
        }
        assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{name} differs from the served bytes");
        // snapshots hold relative links into blobs/, as huggingface_hub lays them out
        let link = std::fs::read_link(&path).unwrap();
        assert!(link.starts_with("../../blobs"), "{name} -> {}", link.display());
    }
    // LFS blobs are named by their sha256
    assert!(blobs(cache.path()).contains(&sha256_hex(&files[SHARD1])));
    assert!(!blobs(cache.path()).iter().any(|b| b.ends_with(".incomplete")));
    // the LFS shards came through their redirect to the storage path
    let gets: Vec<String> = hub.requests().into_iter().filter(|r| r.method == "GET").map(|r| r.path).collect();
    assert_eq!(gets.iter().filter(|p| p.starts_with("/cdn/")).count(), 2, "{gets:?}");

    // the snapshot is a loadable checkpoint
    let ckpt = moeserve_quant::Checkpoint::open(&dir).unwrap();
    assert!(ckpt.contains("lm_head.weight"));

    // a second resolution is served from the cache without a single request
    let before = hub.request_count();
    assert_eq!(resolve_model(REPO, &opts(cache.path(), &hub)).unwrap(), dir);
    assert_eq!(hub.request_count(), before);
    // and offline mode finds it too
    let mut offline = opts(cache.path(), &hub);
    offline.offline = true;
    offline.endpoint = "http://127.0.0.1:9".into();
    assert_eq!(resolve_model(REPO, &offline).unwrap(), dir);
}

#[test]
fn an_interrupted_transfer_resumes_with_a_range_request() {
    let mut repo = Repo::tiny_v3(REPO);
    repo.cut_once.insert(SHARD2.into());
    let hub = FakeHub::start(repo);
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve_model(REPO, &opts(cache.path(), &hub)).unwrap();

    let expected =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v3").join(SHARD2)).unwrap();
    assert_eq!(std::fs::read(dir.join(SHARD2)).unwrap(), expected);
    let sha = sha256_hex(&expected);
    let ranged: Vec<_> = hub.requests().into_iter().filter(|r| r.path == format!("/cdn/{sha}") && r.range.is_some()).collect();
    assert_eq!(ranged.len(), 1, "{:?}", hub.requests());
    // it resumed where the cut left it, not from zero
    assert_eq!(ranged[0].range.as_deref(), Some(format!("bytes={}-", expected.len() / 2).as_str()));
}

#[test]
fn a_partial_file_left_by_an_earlier_run_is_resumed() {
    let hub = FakeHub::start(Repo::tiny_v3(REPO));
    let cache = tempfile::tempdir().unwrap();
    let shard = hub.repo.lock().unwrap().files[SHARD1].clone();
    let sha = sha256_hex(&shard);
    let blobs_dir = repo_dir(cache.path()).join("blobs");
    std::fs::create_dir_all(&blobs_dir).unwrap();
    std::fs::write(blobs_dir.join(format!("{sha}.incomplete")), &shard[..1000]).unwrap();

    let dir = resolve_model(REPO, &opts(cache.path(), &hub)).unwrap();
    assert_eq!(std::fs::read(dir.join(SHARD1)).unwrap(), shard);
    let req = hub.requests().into_iter().find(|r| r.path == format!("/cdn/{sha}")).unwrap();
    assert_eq!(req.range.as_deref(), Some("bytes=1000-"));
}

#[test]
fn a_corrupted_file_is_rejected_and_never_enters_the_snapshot() {
    let mut repo = Repo::tiny_v3(REPO);
    repo.corrupt.insert(SHARD2.into());
    let hub = FakeHub::start(repo);
    let cache = tempfile::tempdir().unwrap();
    let e = err_text(resolve_model(REPO, &opts(cache.path(), &hub)));
    assert!(e.contains(REPO) && e.contains(SHARD2) && e.contains("checksum mismatch"), "{e}");

    let sha = sha256_hex(&hub.repo.lock().unwrap().files[SHARD2]);
    assert!(!blobs(cache.path()).iter().any(|b| b.starts_with(&sha)), "{:?}", blobs(cache.path()));
    let snapshots = repo_dir(cache.path()).join("snapshots");
    assert!(!snapshots.exists() || std::fs::read_dir(&snapshots).unwrap().next().is_none());
    assert!(!repo_dir(cache.path()).join("refs/main").exists());

    // the corruption gone, the next run completes (reusing the blobs that did verify)
    hub.repo.lock().unwrap().corrupt.clear();
    let before = hub.request_count();
    let dir = resolve_model(REPO, &opts(cache.path(), &hub)).unwrap();
    assert!(dir.join(SHARD2).is_file());
    let gets: Vec<_> = hub.requests()[before..].iter().filter(|r| r.method == "GET").map(|r| r.path.clone()).collect();
    assert_eq!(gets.len(), 2, "only the bad shard again (its resolve URL and the redirect): {gets:?}");
    assert_eq!(gets[1], format!("/cdn/{sha}"));
}

#[test]
fn offline_with_an_empty_cache_is_a_clear_error() {
    let hub = FakeHub::start(Repo::tiny_v3(REPO));
    let cache = tempfile::tempdir().unwrap();
    let mut o = opts(cache.path(), &hub);
    o.offline = true;
    let e = err_text(resolve_model(REPO, &o));
    assert!(e.contains(REPO) && e.contains("HF_HUB_OFFLINE") && e.contains("config.json"), "{e}");
    assert_eq!(hub.request_count(), 0);
}

#[test]
fn a_missing_shard_names_the_repo_and_the_file() {
    let mut repo = Repo::tiny_v3(REPO);
    repo.files.remove(SHARD2);
    let hub = FakeHub::start(repo);
    let cache = tempfile::tempdir().unwrap();
    let e = err_text(resolve_model(REPO, &opts(cache.path(), &hub)));
    assert!(e.contains(REPO) && e.contains(SHARD2) && e.contains("404"), "{e}");
}

#[test]
fn an_unknown_repo_or_revision_is_a_clear_error() {
    let hub = FakeHub::start(Repo::tiny_v3(REPO));
    let cache = tempfile::tempdir().unwrap();
    let e = err_text(resolve_model("nobody/nothing", &opts(cache.path(), &hub)));
    assert!(e.contains("nobody/nothing") && e.contains("repository not found") && e.contains("HF_TOKEN"), "{e}");
    let e = err_text(resolve_model(&format!("{REPO}@no-such-branch"), &opts(cache.path(), &hub)));
    assert!(e.contains("no-such-branch") && e.contains("revision not found"), "{e}");
    // neither a directory nor a model id
    let e = err_text(resolve_model("./no/such/dir", &opts(cache.path(), &hub)));
    assert!(e.contains("no such directory"), "{e}");
}

#[test]
fn a_gated_repo_needs_hf_token_and_gets_it_as_a_bearer_header() {
    let mut repo = Repo::tiny_v3(REPO);
    repo.token = Some("hf_secret".into());
    let hub = FakeHub::start(repo);
    let cache = tempfile::tempdir().unwrap();
    let e = err_text(resolve_model(REPO, &opts(cache.path(), &hub)));
    assert!(e.contains(REPO) && e.contains("401") && e.contains("HF_TOKEN"), "{e}");

    let mut o = opts(cache.path(), &hub);
    o.token = Some("hf_wrong".into());
    let e = err_text(resolve_model(REPO, &o));
    assert!(e.contains("does not grant access"), "{e}");

    o.token = Some("hf_secret".into());
    resolve_model(REPO, &o).unwrap();
    let resolves = hub.requests().into_iter().filter(|r| r.path.contains("/resolve/")).collect::<Vec<_>>();
    assert!(resolves.iter().any(|r| r.auth.as_deref() == Some("Bearer hf_secret")));
}

#[test]
fn a_revision_resolves_to_its_commit_and_is_recorded_in_refs() {
    let mut repo = Repo::tiny_v3(REPO);
    repo.revisions.insert("v1".into(), COMMIT.into());
    let hub = FakeHub::start(repo);
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve_model(&format!("{REPO}@v1"), &opts(cache.path(), &hub)).unwrap();
    assert!(dir.ends_with(COMMIT));
    assert_eq!(std::fs::read_to_string(repo_dir(cache.path()).join("refs/v1")).unwrap(), COMMIT);
    assert!(!repo_dir(cache.path()).join("refs/main").exists());
    // every file after config.json was asked for at the pinned commit, not the branch name
    let paths: Vec<String> = hub.requests().into_iter().map(|r| r.path).filter(|p| p.contains("/resolve/")).collect();
    assert_eq!(paths.iter().filter(|p| p.contains("/resolve/v1/")).count(), 1, "{paths:?}");

    // offline, both the name and the commit find the snapshot
    let mut o = opts(cache.path(), &hub);
    o.offline = true;
    assert_eq!(resolve_model(&format!("{REPO}@v1"), &o).unwrap(), dir);
    assert_eq!(resolve_model(&format!("{REPO}@{COMMIT}"), &o).unwrap(), dir);
    let e = err_text(resolve_model(REPO, &o));
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn a_single_file_repo_without_tokenizer_is_complete_and_cached() {
    let mut repo = Repo::new(REPO);
    let tiny = Repo::tiny_v3(REPO);
    repo.files.insert("config.json".into(), tiny.files["config.json"].clone());
    repo.files.insert("model.safetensors".into(), tiny.files[SHARD1].clone());
    let hub = FakeHub::start(repo);
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve_model(REPO, &opts(cache.path(), &hub)).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), tiny.files[SHARD1]);
    assert!(!dir.join("tokenizer.json").exists());
    // the files the repo lacks are remembered, so the next run needs no network at all
    assert!(repo_dir(cache.path()).join(".no_exist").join(COMMIT).join("tokenizer.json").exists());
    let before = hub.request_count();
    resolve_model(REPO, &opts(cache.path(), &hub)).unwrap();
    assert_eq!(hub.request_count(), before);
}

#[test]
fn a_local_directory_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let o = HubOptions::new(dir.path().join("unused"));
    assert_eq!(resolve_model(dir.path().to_str().unwrap(), &o).unwrap(), dir.path());
}
