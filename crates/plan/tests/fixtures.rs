//! The plan's checkpoint bytes equal the bytes actually stored in the fixture checkpoints'
//! safetensors (bf16, FP8 with [32, 16] blocks and partial edge blocks, V2 with q_proj), per class.

use std::path::PathBuf;

use moeserve_core::DeepSeekConfig;
use moeserve_plan::{headers, Class, Inventory};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn check(name: &str, expected_total: u64, expected_tensors: u64) {
    let dir = fixture(name);
    let cfg = DeepSeekConfig::from_file(&dir.join("config.json")).unwrap();
    let inv = Inventory::from_config(&cfg);
    let found = headers::read(&dir, &cfg).unwrap();
    assert!(found.unclassified.is_empty(), "{:?}", found.unclassified);
    // the sum of the safetensors data_offsets ranges, as a Python one-liner over the headers gives
    assert_eq!(found.bytes, expected_total, "{name}");
    assert_eq!(found.tensors, expected_tensors, "{name}");
    assert_eq!(inv.source_bytes(), found.bytes, "{name}");
    assert_eq!(inv.tensor_files(), found.tensors, "{name}");
    for class in Class::ALL {
        for mtp in [false, true] {
            let got = found.by_class.get(&(class, mtp)).copied().unwrap_or(0);
            assert_eq!(inv.class_source_bytes(class, mtp), got, "{name}: {} (mtp {mtp})", class.name());
        }
    }
}

#[test]
fn bf16_fixture_bytes_match_the_plan() {
    check("tiny-v3", 2_945_344, 207);
}

#[test]
fn fp8_fixture_bytes_match_the_plan() {
    check("tiny-v3-fp8", 2_536_992, 383);
}

#[test]
fn v2_fixture_bytes_match_the_plan() {
    check("tiny-v2", 669_936, 107);
}

#[test]
fn v2_lite_preset_has_its_published_size() {
    let cfg = moeserve_plan::presets::find("deepseek-v2-lite").unwrap().config().unwrap();
    let p = Inventory::from_config(&cfg).params(None) as f64 / 1e9;
    assert!((15.6..15.8).contains(&p), "{p}"); // "15.7B" on the model card
}
