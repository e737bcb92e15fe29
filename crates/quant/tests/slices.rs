//! Row/column slices (for tensor and expert parallelism) equal the same slice of the full tensor.

use std::path::PathBuf;

use candle_core::{DType, Device};
use moeserve_quant::{Checkpoint, Slice};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn values(t: candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn bf16_row_and_column_slices() {
    let ckpt = Checkpoint::open(&fixture("tiny-v3")).unwrap();
    let name = "model.layers.1.self_attn.kv_b_proj.weight"; // [128, 32]
    let full = ckpt.load(name, &Slice::full(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(full.dims(), [128, 32]);
    let rows = ckpt.load(name, &Slice::rows(32..64), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(values(rows), values(full.narrow(0, 32, 32).unwrap()));
    let cols = ckpt.load(name, &Slice::cols(5..21), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(values(cols), values(full.narrow(1, 5, 16).unwrap()));
    let both = Slice { rows: Some(100..128), cols: Some(0..3) };
    let part = ckpt.load(name, &both, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(values(part), values(full.narrow(0, 100, 28).unwrap().narrow(1, 0, 3).unwrap()));
    let e = ckpt.load(name, &Slice::rows(100..200), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("out of bounds"), "{e}");
}

#[test]
fn fp8_slices_dequantize_with_their_own_blocks() {
    let ckpt = Checkpoint::open(&fixture("tiny-v3-fp8")).unwrap();
    let name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"; // [40, 64]: partial row block
    let scale = format!("{name}_scale_inv");
    let block = [32, 16];
    let full = ckpt.load_fp8(name, &scale, block, &Slice::full(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(full.dims(), [40, 64]);
    let s = Slice { rows: Some(30..40), cols: Some(10..50) };
    let part = ckpt.load_fp8(name, &scale, block, &s, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(values(part), values(full.narrow(0, 30, 10).unwrap().narrow(1, 10, 40).unwrap()));
    // a wrong block size no longer matches the scale tensor's shape
    let e = ckpt.load_fp8(name, &scale, [128, 128], &Slice::full(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(&scale), "{e}");
}
