//! Synthetic checkpoints use the official layout and load like real ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use moeserve_core::DeepSeekConfig;
use moeserve_model::synth::{self, SynthOptions};
use moeserve_model::{DeepSeekModel, ForwardBatch, LoadOptions};
use moeserve_quant::Checkpoint;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// name -> (dtype, shape) of every tensor in a checkpoint directory.
fn layout(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let ckpt = Checkpoint::open(dir).unwrap();
    ckpt.tensor_names()
        .map(|n| {
            let m = ckpt.meta(n).unwrap();
            (n.to_string(), (format!("{:?}", m.dtype), m.shape.clone()))
        })
        .collect()
}

#[test]
fn synthetic_layout_equals_the_official_fixture_layout() {
    for (fixture_dir, fp8) in [("tiny-v3", None), ("tiny-v3-fp8", Some([32, 16]))] {
        let cfg = DeepSeekConfig::from_file(&fixture("tiny-v3").join("config.json")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = SynthOptions { fp8_block: fp8, shard_bytes: 1 << 20, ..Default::default() };
        let report = synth::write_checkpoint(&cfg, out.path(), &opts).unwrap();
        assert!(report.files.len() > 1, "small shard size must give several shards");
        assert_eq!(layout(out.path()), layout(&fixture(fixture_dir)), "{fixture_dir}");
        let written = DeepSeekConfig::from_file(&out.path().join("config.json")).unwrap();
        assert_eq!(written.quantization_config.and_then(|q| q.weight_block_size), fp8);
    }
}

#[test]
fn synthetic_fp8_model_tracks_its_bf16_twin() {
    let cfg = synth::preset("tiny").unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth::write_checkpoint(&cfg, a.path(), &SynthOptions::default()).unwrap();
    synth::write_checkpoint(&cfg, b.path(), &SynthOptions { fp8_block: Some([32, 16]), ..Default::default() }).unwrap();
    let ids: Vec<u32> = vec![0, 100, 2000, 30000, 128803, 7, 99];
    let run = |dir: &Path| -> Vec<f32> {
        let m = DeepSeekModel::load(dir, &LoadOptions { dtype: DType::F32, ..Default::default() }).unwrap();
        let mut cache = m.new_cache();
        let h = m.forward(&ForwardBatch::single(&ids, 0), &mut [&mut cache]).unwrap();
        m.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let (x, y) = (run(a.path()), run(b.path()));
    let num: f32 = x.iter().zip(&y).map(|(p, q)| (p - q) * (p - q)).sum::<f32>().sqrt();
    let den: f32 = x.iter().map(|p| p * p).sum::<f32>().sqrt();
    // e4m3 keeps 3 mantissa bits: the fixtures show 5-10 % on logits for [32, 16] blocks
    assert!(num / den < 0.15 && num / den > 1e-4, "fp8 vs bf16 relative error {}", num / den);
}

#[test]
fn unknown_preset_is_an_error() {
    assert!(synth::preset("huge").unwrap_err().to_string().contains("huge"));
}
