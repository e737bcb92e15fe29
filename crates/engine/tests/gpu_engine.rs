//! The engine's paged latent cache on CUDA: decode steps read the pages in place through the MLA
//! decode kernel (`LatentKv::paged`), checked against the CPU model with a contiguous cache.
//! Needs an NVIDIA GPU: run by `scripts/gpu-check.sh run`.

use std::path::PathBuf;

use candle_core::{DType, Device};
use moeserve_engine::kv::{BlockTable, CachePart, PagePool, PagedSeq};
use moeserve_kernels::reference::relative_error;
use moeserve_model::{DeepSeekModel, ForwardBatch, LoadOptions};

fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("MOESERVE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    root.join("tests/fixtures").join(name)
}

#[test]
fn paged_decode_on_the_gpu_matches_the_cpu() {
    let dev = Device::new_cuda(0).unwrap_or_else(|e| panic!("gpu_engine needs a CUDA device (scripts/gpu-check.sh run): {e}"));
    let ids: Vec<u32> = (0..70u32).map(|i| (i * 104_729 + 5) % 1000 + 2).collect();
    for dir in ["tiny-v3", "tiny-v3-fp8"] {
        let opts = |device| LoadOptions { dtype: DType::F32, device, load_mtp: false, ..Default::default() };
        let cpu = DeepSeekModel::load(&fixture(dir), &opts(Device::Cpu)).unwrap();
        let gpu = DeepSeekModel::load(&fixture(dir), &opts(dev.clone())).unwrap();
        let layout = gpu.kv_layout();
        // small pages, handed out in a scattered order
        let mut pool = PagePool::new(layout, 4, 64, DType::F32, &dev).unwrap();
        let decoy: Vec<_> = (0..5).filter_map(|_| pool.allocate()).collect();
        let mut table = BlockTable::default();
        let mut cache = cpu.new_cache();
        let prefill = 9;
        for (step, (start, len)) in std::iter::once((0, prefill)).chain((prefill..ids.len()).map(|i| (i, 1))).enumerate() {
            let chunk = &ids[start..start + len];
            let want = cpu.logits(&cpu.forward(&ForwardBatch::single(chunk, start), &mut [&mut cache]).unwrap()).unwrap();
            assert!(table.reserve(&mut pool, start + len), "pool exhausted");
            let got = {
                let mut seq = PagedSeq { pool: &pool, table: &mut table, part: CachePart::Main };
                gpu.logits(&gpu.forward(&ForwardBatch::single(chunk, start), &mut [&mut seq]).unwrap()).unwrap()
            };
            let (g, w): (Vec<f32>, Vec<f32>) =
                (got.flatten_all().unwrap().to_vec1().unwrap(), want.flatten_all().unwrap().to_vec1().unwrap());
            let e = relative_error(&g, &w);
            assert!(e < 1e-3, "{dir} step {step} (positions {start}..{}): relative error {e}", start + len);
        }
        println!("{dir}: {} decode steps over {} pages match", ids.len() - prefill, table.pages.len());
        for p in decoy {
            pool.release(p);
        }
    }
}
