//! Bad checkpoints give errors naming the file, tensor or field, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use moeserve_model::{DeepSeekModel, LoadOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// A writable copy of a fixture directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match DeepSeekModel::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn shard_of(dir: &Path, tensor: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    index["weight_map"][tensor].as_str().unwrap().to_string()
}

/// Rewrite the shard holding `tensor` with `edit` applied to its tensors.
fn rewrite_shard(dir: &Path, tensor: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> String {
    let shard = shard_of(dir, tensor);
    let path = dir.join(&shard);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    shard
}

fn drop_from_index(dir: &Path, tensor: &str) {
    let p = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove(tensor);
    std::fs::write(&p, index.to_string()).unwrap();
}

const KV_B: &str = "model.layers.1.self_attn.kv_b_proj.weight";

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("tiny-v3");
    rewrite_shard(dir.path(), KV_B, |t| {
        t.remove(KV_B);
    });
    // also drop it from the index so only the missing tensor itself is at fault
    drop_from_index(dir.path(), KV_B);
    let e = load_err(dir.path());
    assert!(e.contains(KV_B) && e.contains("not found"), "{e}");
}

#[test]
fn index_entry_without_tensor_is_named() {
    let dir = copy_fixture("tiny-v3");
    let shard = rewrite_shard(dir.path(), KV_B, |t| {
        t.remove(KV_B);
    });
    let e = load_err(dir.path());
    assert!(e.contains(KV_B) && e.contains(&shard), "{e}");
}

#[test]
fn wrong_shape_is_named_with_file_and_shapes() {
    let dir = copy_fixture("tiny-v3");
    let shard = rewrite_shard(dir.path(), KV_B, |t| {
        let w = t[KV_B].clone();
        t.insert(KV_B.into(), w.narrow(0, 0, 64).unwrap());
    });
    let e = load_err(dir.path());
    assert!(e.contains(KV_B) && e.contains(&shard) && e.contains("[128, 32]") && e.contains("[64, 32]"), "{e}");
}

#[test]
fn truncated_shard_is_named() {
    let dir = copy_fixture("tiny-v3");
    let shard = shard_of(dir.path(), KV_B);
    let path = dir.path().join(&shard);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 1000).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains(&shard) && e.contains("truncated") && e.contains("tensor `"), "{e}");
}

#[test]
fn missing_shard_file_is_named() {
    let dir = copy_fixture("tiny-v3");
    let shard = shard_of(dir.path(), KV_B);
    std::fs::remove_file(dir.path().join(&shard)).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains(&shard), "{e}");
}

#[test]
fn fp8_weight_without_scale_is_named() {
    let dir = copy_fixture("tiny-v3-fp8");
    let scale = format!("{KV_B}_scale_inv");
    let shard = rewrite_shard(dir.path(), &scale, |t| {
        t.remove(&scale);
    });
    drop_from_index(dir.path(), &scale);
    let e = load_err(dir.path());
    assert!(e.contains(&scale), "{e} (shard {shard})");
}

#[test]
fn fp8_scale_of_wrong_shape_is_named() {
    let dir = copy_fixture("tiny-v3-fp8");
    let scale = format!("{KV_B}_scale_inv");
    rewrite_shard(dir.path(), &scale, |t| {
        let s = t[&scale].clone();
        t.insert(scale.clone(), s.narrow(0, 0, 2).unwrap());
    });
    let e = load_err(dir.path());
    assert!(e.contains(&scale) && e.contains("expected shape [4, 2]"), "{e}");
}

#[test]
fn bad_config_field_is_named() {
    let dir = copy_fixture("tiny-v3");
    let p = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("kv_lora_rank");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("kv_lora_rank") && e.contains("config.json"), "{e}");
}

#[test]
fn directory_without_weights_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny-v3").join("config.json"), dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
    let none = tempfile::tempdir().unwrap();
    assert!(load_err(none.path()).contains("config.json"));
}

#[test]
fn out_of_range_token_and_cache_mismatch_are_errors() {
    let model = DeepSeekModel::load(&fixture("tiny-v3"), &LoadOptions::default()).unwrap();
    let mut cache = model.new_cache();
    let e = model.forward(&moeserve_model::ForwardBatch::single(&[0, 5000], 0), &mut [&mut cache]).unwrap_err();
    assert!(e.to_string().contains("5000"), "{e}");
    let e = model.forward(&moeserve_model::ForwardBatch::single(&[0, 1], 3), &mut [&mut cache]).unwrap_err();
    assert!(e.to_string().contains("cache holds 0"), "{e}");
}
