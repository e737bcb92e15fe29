//! `--model ORG/NAME` end to end: the binary fetches a model from a stand-in Hub (HF_ENDPOINT) into
//! the standard cache under HF_HOME, generates with it, then runs again offline from the cache.

#[path = "../../crates/hub/tests/fake_hub/mod.rs"]
mod fake_hub;

use std::path::Path;
use std::process::{Command, Output};

use fake_hub::{FakeHub, Repo, COMMIT};

fn generate(hf_home: &Path, endpoint: &str, offline: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moeserve"));
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE"] {
        cmd.env_remove(k);
    }
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env("MOESERVE_CACHE", hf_home.join("moeserve"))
        .args(["generate", "--model", "tiny-org/tiny-v3", "--input-ids", "0,12,7", "--max-tokens", "4"])
        .args(["--temperature", "0", "--ignore-eos", "--output", "ids"])
        .output()
        .unwrap()
}

fn ids(out: &Output) -> Vec<u32> {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

#[test]
fn generate_with_a_hub_model_id_downloads_once_then_runs_offline() {
    let hub = FakeHub::start(Repo::tiny_v3("tiny-org/tiny-v3"));
    let home = tempfile::tempdir().unwrap();
    let first = ids(&generate(home.path(), &hub.endpoint, false));
    assert_eq!(first.len(), 4);
    let snapshot = home.path().join("hub/models--tiny-org--tiny-v3/snapshots").join(COMMIT);
    assert!(snapshot.join("config.json").is_file() && snapshot.join("tokenizer.json").is_file());

    let before = hub.request_count();
    let again = ids(&generate(home.path(), "http://127.0.0.1:9", true));
    assert_eq!(again, first);
    assert_eq!(hub.request_count(), before);

    // offline with an empty cache: a clear error, no panic
    let empty = tempfile::tempdir().unwrap();
    let out = generate(empty.path(), &hub.endpoint, true);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("tiny-org/tiny-v3") && e.contains("HF_HUB_OFFLINE") && !e.contains("panicked"), "{e}");
}
