//! The kernels crate's CPU references (what every CUDA kernel is tested against) agree with the
//! model's own candle math: router selection, rope, RMSNorm.

use candle_core::{DType, Device, Tensor};
use moeserve_core::{DeepSeekConfig, ScoringFunc, TopkMethod};
use moeserve_kernels::reference::router::{self as kr, Method, RouteConfig, Scoring};
use moeserve_kernels::reference::{elementwise, relative_error};
use moeserve_model::norm::RmsNorm;
use moeserve_model::rope::Rope;
use moeserve_model::router::{Router, RouterConfig};
use rand::{Rng, SeedableRng};

fn kernel_config(c: &RouterConfig) -> RouteConfig {
    RouteConfig {
        n_experts: c.n_experts,
        top_k: c.top_k,
        n_group: c.n_group,
        topk_group: c.topk_group,
        scoring: match c.scoring {
            ScoringFunc::Sigmoid => Scoring::Sigmoid,
            ScoringFunc::Softmax => Scoring::Softmax,
        },
        method: match c.method {
            TopkMethod::Greedy => Method::Greedy,
            TopkMethod::GroupLimitedGreedy => Method::GroupLimitedGreedy,
            TopkMethod::NoauxTc => Method::NoauxTc,
        },
        norm_topk_prob: c.norm_topk_prob,
        scaling: c.scaling,
    }
}

#[test]
fn router_reference_selects_like_the_model() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let configs = [
        (256, 8, 8, 4, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, 2.5),
        (64, 6, 8, 3, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, false, 1.0),
        (10, 3, 1, 1, TopkMethod::Greedy, ScoringFunc::Softmax, true, 1.0),
        (16, 4, 4, 2, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, 2.5),
    ];
    for (n_experts, top_k, n_group, topk_group, method, scoring, norm, scaling) in configs {
        let cfg = RouterConfig {
            n_experts,
            top_k,
            n_group,
            topk_group,
            method,
            scoring,
            norm_topk_prob: norm,
            scaling,
            dtype: DType::F32,
        };
        let bias: Vec<f32> = (0..n_experts).map(|_| rng.gen::<f32>() + 1.5).collect();
        let bias = (method == TopkMethod::NoauxTc).then_some(bias);
        let router = Router::new(cfg.clone(), Tensor::zeros((n_experts, 4), DType::F32, &Device::Cpu).unwrap(), bias.clone());
        for _ in 0..50 {
            let logits: Vec<f32> = (0..n_experts).map(|_| rng.gen::<f32>() * 8.0 - 4.0).collect();
            let (e, w) = router.select(&logits);
            let (ke, kw) = kr::route(&kernel_config(&cfg), &logits, bias.as_deref());
            assert_eq!(ke, e.iter().map(|&x| x as u32).collect::<Vec<_>>(), "{cfg:?}");
            assert!(relative_error(&kw, &w) < 1e-7, "{cfg:?}: {kw:?} vs {w:?}");
        }
    }
}

#[test]
fn rope_reference_rotates_like_the_model() {
    let cfg = DeepSeekConfig::from_json_str(include_str!("../../../models/deepseek-r1-0528/config.json"), "r1").unwrap();
    let rope = Rope::new(&cfg);
    let (n, heads, dim) = (5, 3, cfg.qk_rope_head_dim);
    let positions = [0, 1, 17, 4000, 100_000];
    let x = Tensor::randn(0f32, 1.0, (n, heads, dim), &Device::Cpu).unwrap();
    let got: Vec<f32> =
        rope.tables(&positions, &Device::Cpu).unwrap().apply(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let half = dim / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in &positions {
        for &f in rope.inv_freq() {
            cos.push((p as f32 * f).cos()); // R1's attention scaling is 1
            sin.push((p as f32 * f).sin());
        }
    }
    assert_eq!(cos.len(), n * half);
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let want = elementwise::rope_interleaved(&xs, &cos, &sin, n, heads, dim, heads * dim, dim);
    assert!(relative_error(&got, &want) < 1e-6, "relative error {}", relative_error(&got, &want));
}

#[test]
fn rms_norm_reference_matches_the_model_in_f32_and_bf16() {
    let (rows, dim) = (7, 96);
    let x = (Tensor::randn(0f32, 1.0, (rows, dim), &Device::Cpu).unwrap() * 3.0).unwrap();
    let w = Tensor::randn(0f32, 1.0, dim, &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (xd, wd) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
        let norm = RmsNorm::new(wd.clone(), 1e-6);
        let got: Vec<f32> = norm.forward(&xd).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let held = |t: &Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        let want = elementwise::rms_norm(&held(&xd), &held(&wd), dim, 1e-6, dtype == DType::BF16);
        let e = relative_error(&got, &want);
        assert!(e < if dtype == DType::BF16 { 1e-2 } else { 1e-6 }, "{dtype:?}: relative error {e}");
    }
}
