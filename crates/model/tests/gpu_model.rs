//! The whole model on CUDA against the same model on the CPU (the golden-tested path), for every
//! fixture (V3 bf16 weights, V3 FP8 weights through the FP8 GEMM kernel, V2): prefill and
//! token-by-token decode, f32 and bf16. Needs an NVIDIA GPU: run by `scripts/gpu-check.sh run`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use moeserve_kernels::reference::relative_error;
use moeserve_model::{AttnMode, DeepSeekModel, ForwardBatch, LoadOptions};

fn fixture(name: &str) -> PathBuf {
    // on the GPU machine the repository sits elsewhere than where this binary was built
    let root = std::env::var_os("MOESERVE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    root.join("tests/fixtures").join(name)
}

fn gpu() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| panic!("gpu_model needs a CUDA device (scripts/gpu-check.sh run): {e}"))
}

fn load(dir: &str, dtype: DType, device: Device) -> DeepSeekModel {
    DeepSeekModel::load(&fixture(dir), &LoadOptions { dtype, device, load_mtp: false, ..Default::default() })
        .unwrap_or_else(|e| panic!("loading {dir}: {e}"))
}

fn rows(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Logits of a prefill of `ids[..split]` and then one token at a time, in `attn` mode.
fn run(model: &DeepSeekModel, ids: &[u32], split: usize, attn: AttnMode) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let h = model.forward(&ForwardBatch::single(&ids[..split], 0).with_attn(attn), &mut [&mut cache]).unwrap();
    out.extend(rows(&model.logits(&h).unwrap()));
    for (i, &t) in ids.iter().enumerate().skip(split) {
        let h = model.forward(&ForwardBatch::single(&[t], i).with_attn(attn), &mut [&mut cache]).unwrap();
        out.extend(rows(&model.logits(&h).unwrap()));
    }
    out
}

#[test]
fn every_fixture_matches_the_cpu_model() {
    let dev = gpu();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 7919 + 13) % 1000 + 2).collect();
    for dir in ["tiny-v3", "tiny-v3-fp8", "tiny-v2"] {
        let cpu = load(dir, DType::F32, Device::Cpu);
        for attn in [AttnMode::Auto, AttnMode::Naive, AttnMode::Absorbed] {
            let want = run(&cpu, &ids, 29, attn);
            for (dtype, tol) in [(DType::F32, 1e-3), (DType::BF16, 6e-2)] {
                let gpu_model = load(dir, dtype, dev.clone());
                let got = run(&gpu_model, &ids, 29, attn);
                let e = relative_error(&got, &want);
                println!("{dir} {attn:?} {dtype:?}: logits relative error {e:.2e}");
                assert!(e < tol, "{dir} {attn:?} {dtype:?}: logits relative error {e} (tolerance {tol})");
            }
        }
    }
}
