//! llama.cpp GGUF (`deepseek2`) input: a GGUF written in llama.cpp's layout from the tiny-v3
//! fixture loads with the same config and gives the same logits; quantized blocks are used as
//! stored; split files, the split `attn_k_b`/`attn_v_b` form and corrupt files are handled.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use moeserve_model::{eval, DeepSeekModel, ForwardBatch, LoadOptions};
use moeserve_quant::gguf::{export, KvB};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn load(path: &Path) -> DeepSeekModel {
    DeepSeekModel::load(path, &LoadOptions { load_mtp: false, ..Default::default() }).unwrap()
}

fn logits(model: &DeepSeekModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let h = model.forward(&ForwardBatch::single(ids, 0), &mut [&mut cache]).unwrap();
    model.logits(&h).unwrap().to_vec2().unwrap()
}

const IDS: [u32; 12] = [0, 17, 2049, 33, 4000, 5, 912, 77, 3001, 8, 1234, 99];

#[test]
fn f32_gguf_matches_the_safetensors_model_in_both_kv_b_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = load(&fixture("tiny-v3"));
    let want = logits(&reference, &IDS);
    for kv_b in [KvB::Fused, KvB::Split] {
        let path = tmp.path().join(format!("tiny-{kv_b:?}.gguf"));
        export(&fixture("tiny-v3"), &path, GgmlDType::F32, kv_b).unwrap();
        let model = load(&path);
        // the config read from llama.cpp's metadata keys is the checkpoint's
        let (a, b) = (&model.cfg, &reference.cfg);
        assert_eq!(
            (a.hidden_size, a.num_hidden_layers, a.kv_lora_rank, a.q_lora_rank, a.qk_nope_head_dim, a.v_head_dim, a.n_group),
            (b.hidden_size, b.num_hidden_layers, b.kv_lora_rank, b.q_lora_rank, b.qk_nope_head_dim, b.v_head_dim, b.n_group)
        );
        assert_eq!(
            (a.topk_method, a.scoring_func, a.routed_scaling_factor),
            (b.topk_method, b.scoring_func, b.routed_scaling_factor)
        );
        let got = logits(&model, &IDS);
        let err = got.iter().flatten().zip(want.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "{kv_b:?}: max logit difference {err}");
    }
}

#[test]
fn quantized_gguf_blocks_are_used_as_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = load(&fixture("tiny-v3"));
    let windows: Vec<Vec<u32>> = (0..2).map(|w| (0..40).map(|i| ((i * 53 + w * 7) % 4000 + 2) as u32).collect()).collect();
    let mut kld = Vec::new();
    for (q, name) in [(GgmlDType::Q8_0, "q8_0"), (GgmlDType::Q4K, "q4k")] {
        let path = tmp.path().join(format!("tiny-{name}.gguf"));
        export(&fixture("tiny-v3"), &path, q, KvB::Split).unwrap();
        let model = load(&path);
        let report = model.load_report();
        // experts (64 columns in, a whole q8_0 block; q4_K needs 256 and falls back to f32 in the export)
        let formats: Vec<&str> = report.entries.keys().map(|(_, f)| *f).collect();
        assert!(formats.contains(&if q == GgmlDType::Q8_0 { "q8_0" } else { "f32" }), "{name}: {formats:?}");
        let quality = eval::compare(&reference, &model, &windows).unwrap();
        assert!(quality.mean_kld.is_finite() && quality.top1_agreement > 0.5, "{name}: {quality:?}");
        kld.push(quality.mean_kld);
    }
    assert!(kld[0] > 0.0);
}

#[test]
fn split_gguf_files_load_from_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("one.gguf");
    export(&fixture("tiny-v3"), &single, GgmlDType::Q8_0, KvB::Fused).unwrap();
    let dir = tmp.path().join("split");
    std::fs::create_dir(&dir).unwrap();
    moeserve_quant::gguf::split(&single, &dir.join("tiny"), 3).unwrap();
    let first = dir.join("tiny-00001-of-00003.gguf");
    assert!(dir.join("tiny-00003-of-00003.gguf").exists());
    let (a, b) = (logits(&load(&single), &IDS), logits(&load(&first), &IDS));
    assert_eq!(a, b);
    // a missing split is an error naming it
    std::fs::remove_file(dir.join("tiny-00002-of-00003.gguf")).unwrap();
    let err = DeepSeekModel::load(&first, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("tiny-00002-of-00003.gguf"), "{err}");
}

#[test]
fn corrupt_gguf_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    export(&fixture("tiny-v3"), &good, GgmlDType::Q8_0, KvB::Fused).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let err_of = |name: &str, data: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).unwrap();
        DeepSeekModel::load(&p, &LoadOptions::default()).unwrap_err().to_string()
    };
    // bad magic
    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGXX");
    let e = err_of("magic.gguf", &bad);
    assert!(e.contains("magic.gguf") && e.contains("GGUF"), "{e}");
    // unknown tensor type: patch the type id of the first tensor info (after its name and dims)
    let mut bad = bytes.clone();
    let at = first_tensor_type_offset(&bad);
    bad[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = err_of("dtype.gguf", &bad);
    assert!(e.contains("dtype.gguf"), "{e}");
    // truncated data
    let e = err_of("cut.gguf", &bytes[..bytes.len() - 1000]);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
}

/// Byte offset of the ggml type of the first tensor info in a GGUF v2/v3 file.
fn first_tensor_type_offset(b: &[u8]) -> usize {
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let n_kv = u64_at(16);
    let mut o = 24;
    let skip_string = |o: usize| o + 8 + u64_at(o);
    fn value_len(b: &[u8], o: usize, ty: usize) -> usize {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => 8 + u64_at(o),
            9 => {
                let (ety, n) = (u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize, u64_at(o + 4));
                let mut p = o + 12;
                for _ in 0..n {
                    p += value_len(b, p, ety);
                }
                p - o
            }
            _ => panic!("value type {ty}"),
        }
    }
    for _ in 0..n_kv {
        o = skip_string(o);
        let ty = u32_at(o);
        o += 4;
        o += value_len(b, o, ty);
    }
    o = skip_string(o); // tensor name
    let n_dims = u32_at(o);
    o + 4 + 8 * n_dims
}
