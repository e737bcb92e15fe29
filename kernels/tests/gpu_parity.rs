//! GPU parity tests: every kernel against its CPU reference on random, ragged shapes (relative
//! error within f32 / bf16 tolerance). Needs an NVIDIA GPU: run by `scripts/gpu-check.sh run`;
//! fails loudly when no CUDA device can be opened.

use candle_core::{DType, Device, Tensor};
use moeserve_kernels::cuda::ops::{self, GpuWeight};
use moeserve_kernels::reference::gemm::{self as rgemm, WeightRef};
use moeserve_kernels::reference::mla::{self as rmla, MlaShape};
use moeserve_kernels::reference::router::{self as rrouter, Method, RouteConfig, Scoring};
use moeserve_kernels::reference::{elementwise as rel, relative_error, round_bf16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Device {
    match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => panic!("gpu_parity needs a CUDA device (run it through scripts/gpu-check.sh on a GPU machine): {e}"),
    }
}

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// Upload in `dtype`; returns the tensor and the values it holds (bf16-rounded when bf16).
fn upload(v: &[f32], shape: &[usize], dtype: DType, dev: &Device) -> (Tensor, Vec<f32>) {
    let t = Tensor::from_slice(v, shape, dev).unwrap().to_dtype(dtype).unwrap();
    let held = if dtype == DType::BF16 { v.iter().map(|&x| round_bf16(x)).collect() } else { v.to_vec() };
    (t, held)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn tol(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        1e-5
    }
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = relative_error(got, want);
    assert!(e < tol, "{what}: relative error {e} (tolerance {tol})");
    println!("{what}: relative error {e:.2e}");
}

#[test]
fn rms_norm_matches_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in [DType::F32, DType::BF16] {
        for (rows, dim) in [(1, 7168), (13, 512), (5, 1536), (33, 100)] {
            let (x, xh) = upload(&randn(&mut rng, rows * dim, 3.0), &[rows, dim], dtype, &dev);
            let (w, wh) = upload(&randn(&mut rng, dim, 1.0), &[dim], dtype, &dev);
            let got = host(&ops::rms_norm(&x, &w, 1e-6).unwrap());
            let want = rel::rms_norm(&xh, &wh, dim, 1e-6, dtype == DType::BF16);
            check(&format!("rms_norm {dtype:?} [{rows}, {dim}]"), &got, &want, tol(dtype));
        }
    }
}

#[test]
fn rope_matches_reference_on_a_strided_view() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in [DType::F32, DType::BF16] {
        for (n, heads, nope, rope) in [(1, 128, 128, 64), (7, 3, 16, 8), (19, 16, 128, 64)] {
            let width = nope + rope;
            let (q, qh) = upload(&randn(&mut rng, n * heads * width, 2.0), &[n, heads, width], dtype, &dev);
            let angles: Vec<f32> = (0..n * rope / 2).map(|i| i as f32 * 0.37).collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let (ct, _) = upload(&cos, &[n, rope / 2], DType::F32, &dev);
            let (st, _) = upload(&sin, &[n, rope / 2], DType::F32, &dev);
            let view = q.narrow(2, nope, rope).unwrap();
            let got = host(&ops::rope_interleaved(&view, &ct, &st).unwrap());
            let want = rel::rope_interleaved(&qh[nope..], &cos, &sin, n, heads, rope, heads * width, width);
            let want: Vec<f32> = if dtype == DType::BF16 { want.iter().map(|&v| round_bf16(v)).collect() } else { want };
            check(&format!("rope {dtype:?} [{n}, {heads}, {rope}]"), &got, &want, tol(dtype));
        }
    }
}

#[test]
fn cache_write_scatters_into_pages() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in [DType::F32, DType::BF16] {
        let (page_size, pages, row_dim) = (16, 9, 576);
        let (pool, mut want) =
            upload(&randn(&mut rng, page_size * pages * row_dim, 1.0), &[page_size * pages, row_dim], dtype, &dev);
        let table = [4u32, 0, 7, 2];
        let (start, n) = (13, 37);
        let (rows, rh) = upload(&randn(&mut rng, n * row_dim, 1.0), &[n, row_dim], dtype, &dev);
        let slots = rel::slots_for(&table, page_size, start, n);
        ops::cache_write(&pool, &rows, &slots).unwrap();
        rel::cache_write(&mut want, &rh, &slots, row_dim);
        check(&format!("cache_write {dtype:?}"), &host(&pool), &want, 1e-7);
    }
}

#[test]
fn mla_decode_matches_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(4);
    for dtype in [DType::F32, DType::BF16] {
        for (heads, latent, rope, page_size, lens) in [
            (128, 512, 64, 64, vec![1, 77, 1000, 4097]),
            (20, 512, 64, 16, vec![300, 5]),
            (3, 64, 16, 4, vec![9, 1, 33]),
            (16, 512, 64, 64, vec![20_000]),
        ] {
            let nq = lens.len();
            let max_pages = (*lens.iter().max().unwrap() as usize).div_ceil(page_size);
            let pool_pages = max_pages * nq + 3;
            let d = latent + rope;
            // shuffled page ids: every sequence's pages are scattered over the pool
            let mut ids: Vec<i32> = (0..pool_pages as i32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.gen_range(0..=i));
            }
            let table: Vec<i32> = ids[..nq * max_pages].to_vec();
            let (pool, ph) = upload(&randn(&mut rng, pool_pages * page_size * d, 1.0), &[pool_pages * page_size, d], dtype, &dev);
            let (q, qh) = upload(&randn(&mut rng, nq * heads * d, 1.0), &[nq, heads, d], dtype, &dev);
            let lens: Vec<i32> = lens.to_vec();
            let shape = MlaShape { heads, latent, rope, page_size, max_pages, scale: 1.0 / (d as f32).sqrt() * 2.0 };
            let got = host(&ops::mla_decode(&q, &pool, &table, &lens, &shape).unwrap());
            let want = rmla::mla_decode(&shape, &qh, &ph, &table, &lens);
            check(&format!("mla_decode {dtype:?} heads {heads} L {latent} R {rope} lens {lens:?}"), &got, &want, tol(dtype));
        }
    }
}

#[test]
fn router_matches_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    let v3 = RouteConfig {
        n_experts: 256,
        top_k: 8,
        n_group: 8,
        topk_group: 4,
        scoring: Scoring::Sigmoid,
        method: Method::NoauxTc,
        norm_topk_prob: true,
        scaling: 2.5,
    };
    let v2 = RouteConfig {
        n_experts: 64,
        top_k: 6,
        n_group: 8,
        topk_group: 3,
        scoring: Scoring::Softmax,
        method: Method::GroupLimitedGreedy,
        norm_topk_prob: false,
        scaling: 1.0,
    };
    let greedy = RouteConfig {
        n_experts: 10,
        top_k: 3,
        n_group: 1,
        topk_group: 1,
        scoring: Scoring::Softmax,
        method: Method::Greedy,
        norm_topk_prob: true,
        scaling: 1.0,
    };
    for (cfg, n) in [(v3, 1), (v3, 300), (v2, 77), (greedy, 5)] {
        let logits = randn(&mut rng, n * cfg.n_experts, 4.0);
        let bias: Vec<f32> = randn(&mut rng, cfg.n_experts, 1.0).iter().map(|b| b + 2.0).collect();
        let bias_arg = (cfg.method == Method::NoauxTc).then_some(&bias[..]);
        let (lt, _) = upload(&logits, &[n, cfg.n_experts], DType::F32, &dev);
        let (bt, _) = upload(&bias, &[cfg.n_experts], DType::F32, &dev);
        let (e, w) = ops::route(&lt, bias_arg.map(|_| &bt), &cfg).unwrap();
        let (re, rw) = rrouter::route_batch(&cfg, &logits, bias_arg);
        let k = cfg.top_k;
        let same: Vec<usize> = (0..n).filter(|&t| e[t * k..(t + 1) * k] == re[t * k..(t + 1) * k]).collect();
        // exp may differ from the host's in the last bit: allow a rare flip between near-ties
        assert!(same.len() * 100 >= n * 99, "{cfg:?}: {} of {n} tokens route identically", same.len());
        let (gw, ww): (Vec<f32>, Vec<f32>) =
            same.iter().flat_map(|&t| (t * k..(t + 1) * k).map(|i| (w[i], rw[i])).collect::<Vec<_>>()).unzip();
        check(&format!("router {:?}/{:?} n {n}", cfg.method, cfg.scoring), &gw, &ww, 1e-5);
    }
}

fn fp8_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.gen::<u8>()).map(|b| if b & 0x7f == 0x7f { b ^ 0x08 } else { b }).collect()
}

/// A random weight of `kind` on the GPU and its reference values.
struct TestWeight {
    gpu: GpuWeight,
    dense: Vec<f32>,
    bytes: Vec<u8>,
    scale: Vec<f32>,
}

impl TestWeight {
    fn new(rng: &mut StdRng, kind: &str, n: usize, k: usize, dev: &Device) -> Self {
        let block = [128, 128];
        match kind {
            "fp8" => {
                let bytes = fp8_bytes(rng, n * k);
                let scale: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128)).map(|_| rng.gen::<f32>() * 0.01 + 1e-3).collect();
                let data = Tensor::from_slice(&bytes, (n, k), dev).unwrap();
                let st = Tensor::from_slice(&scale, (n.div_ceil(128), k.div_ceil(128)), dev).unwrap();
                TestWeight { gpu: GpuWeight { data, scale: Some(st), block }, dense: vec![], bytes, scale }
            }
            _ => {
                let dtype = if kind == "bf16" { DType::BF16 } else { DType::F32 };
                let (data, dense) = upload(&randn(rng, n * k, 0.05), &[n, k], dtype, dev);
                TestWeight { gpu: GpuWeight { data, scale: None, block }, dense, bytes: vec![], scale: vec![] }
            }
        }
    }

    fn reference(&self) -> WeightRef<'_> {
        if self.bytes.is_empty() {
            WeightRef::Dense(&self.dense)
        } else {
            WeightRef::Fp8 { data: &self.bytes, scale: &self.scale, block: [128, 128] }
        }
    }
}

fn rounded(v: Vec<f32>, dtype: DType) -> Vec<f32> {
    if dtype == DType::BF16 {
        v.into_iter().map(round_bf16).collect()
    } else {
        v
    }
}

#[test]
fn gemm_matches_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(6);
    for kind in ["fp8", "bf16", "f32"] {
        for xdt in [DType::BF16, DType::F32] {
            for (m, n, k) in [(1, 300, 200), (5, 256, 7168), (17, 129, 130), (70, 512, 384)] {
                let w = TestWeight::new(&mut rng, kind, n, k, &dev);
                let (x, xh) = upload(&randn(&mut rng, m * k, 1.0), &[m, k], xdt, &dev);
                let got = host(&ops::gemm(&x, &w.gpu).unwrap());
                let want = rounded(rgemm::gemm(&xh, m, w.reference(), n, k), xdt);
                check(&format!("gemm {kind} x {xdt:?} [{m}, {k}] x [{n}, {k}]"), &got, &want, tol(xdt).max(1e-4));
            }
        }
    }
}

#[test]
fn grouped_gemm_matches_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(7);
    for kind in ["fp8", "bf16"] {
        for xdt in [DType::BF16, DType::F32] {
            for counts in [vec![3, 0, 1, 20, 7], vec![1, 1], vec![90]] {
                let (n, k, tokens) = (384, 256, 40);
                let weights: Vec<TestWeight> = counts.iter().map(|_| TestWeight::new(&mut rng, kind, n, k, &dev)).collect();
                let (x, xh) = upload(&randn(&mut rng, tokens * k, 1.0), &[tokens, k], xdt, &dev);
                let mut offsets = vec![0i32];
                for c in &counts {
                    offsets.push(offsets.last().unwrap() + c);
                }
                let total = *offsets.last().unwrap() as usize;
                let row_idx: Vec<i32> = (0..total).map(|_| rng.gen_range(0..tokens as i32)).collect();
                let refs: Vec<&GpuWeight> = weights.iter().map(|w| &w.gpu).collect();
                let got = host(&ops::grouped_gemm(&x, &row_idx, &offsets, &refs).unwrap());
                let wr: Vec<WeightRef> = weights.iter().map(TestWeight::reference).collect();
                let want = rounded(rgemm::grouped_gemm(&xh, Some(&row_idx), &offsets, &wr, n, k), xdt);
                check(&format!("grouped_gemm {kind} x {xdt:?} counts {counts:?}"), &got, &want, tol(xdt).max(1e-4));
            }
        }
    }
}
