//! Synthetic checkpoints: random weights in the exact official layout (sharded safetensors,
//! index, config; optionally FP8 e4m3 block-scaled with `weight_scale_inv`). Used by the
//! built-in model, benchmarks and tests. Tensors are generated and written one at a time, so a
//! multi-GB checkpoint never sits in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use moeserve_core::{DeepSeekConfig, Error, QuantizationConfig, Result};
use serde_json::json;

use crate::fp8_encode::encode_e4m3;

/// Official DeepSeek config plus preset dimensions.
pub fn preset(name: &str) -> Result<DeepSeekConfig> {
    let (text, what) = match name {
        "tiny" => (TINY, "tiny"),
        "bench-small" => (BENCH_SMALL, "bench-small"),
        "gpu-r1-slice" => (GPU_R1_SLICE, "gpu-r1-slice"),
        other => return Err(Error::Input(format!("unknown preset `{other}` (available: {})", PRESETS.join(", ")))),
    };
    DeepSeekConfig::from_json_str(text, &format!("preset {what}"))
}

pub const PRESETS: [&str; 3] = ["tiny", "bench-small", "gpu-r1-slice"];

/// The built-in model: the fixtures' tiny DeepSeek-V3 shape with the real 129280 vocabulary.
const TINY: &str = r#"{
  "model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 1, "vocab_size": 129280,
  "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3,
  "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 16, "num_experts_per_tok": 4,
  "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
  "norm_topk_prob": true, "routed_scaling_factor": 2.5, "num_attention_heads": 4, "q_lora_rank": 48,
  "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
  "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "num_nextn_predict_layers": 1, "tie_word_embeddings": false
}"#;

/// DeepSeek-V3 scaled to ≈1.6 B stored / ≈0.29 B active parameters (see PERFORMANCE.md).
const BENCH_SMALL: &str = r#"{
  "model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 1, "vocab_size": 129280,
  "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512, "num_hidden_layers": 10,
  "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 64, "num_experts_per_tok": 6,
  "n_shared_experts": 2, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
  "norm_topk_prob": true, "routed_scaling_factor": 2.5, "num_attention_heads": 16, "q_lora_rank": 512,
  "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
  "max_position_embeddings": 16384, "rms_norm_eps": 1e-6, "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "num_nextn_predict_layers": 1, "tie_word_embeddings": false
}"#;

/// R1's per-layer shapes (hidden 7168, 128 MLA heads, latent 512 + rope 64, experts 2048 wide,
/// top-8 of 8 groups) with 6 layers and 32 routed experts: ≈ 14 GB in FP8, so that a GPU decode
/// and prefill measurement (`scripts/gpu-check.sh`) runs the real kernel shapes in minutes.
const GPU_R1_SLICE: &str = r#"{
  "model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 1, "vocab_size": 129280,
  "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 6,
  "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 32, "num_experts_per_tok": 8,
  "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
  "norm_topk_prob": true, "routed_scaling_factor": 2.5, "num_attention_heads": 128, "q_lora_rank": 1536,
  "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
  "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
  "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "num_nextn_predict_layers": 1, "tie_word_embeddings": false
}"#;

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub seed: u64,
    /// Store projections as FP8 e4m3 with this `[rows, cols]` scale block.
    pub fp8_block: Option<[usize; 2]>,
    /// Target shard size in bytes.
    pub shard_bytes: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions { seed: 0x5EED, fp8_block: None, shard_bytes: 2 << 30 }
    }
}

#[derive(Debug, Clone)]
pub struct SynthReport {
    pub files: Vec<PathBuf>,
    pub bytes: u64,
    pub params: u64,
}

#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(0, std²), stored bf16 (or FP8 for projections)
    Normal(f32),
    /// 1 + N(0, 0.1²): RMSNorm weights
    Norm,
    /// 2 + N(0, 0.15²), float32: R1-like router correction bias
    Bias,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stored {
    Bf16,
    F32,
    Fp8,
    /// The float32 `weight_scale_inv` of the preceding FP8 weight
    Scale,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    stored: Stored,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn bytes(&self) -> usize {
        self.numel()
            * match self.stored {
                Stored::Bf16 => 2,
                Stored::F32 | Stored::Scale => 4,
                Stored::Fp8 => 1,
            }
    }
    fn dtype(&self) -> &'static str {
        match self.stored {
            Stored::Bf16 => "BF16",
            Stored::F32 | Stored::Scale => "F32",
            Stored::Fp8 => "F8_E4M3",
        }
    }
}

const FP8_SUFFIXES: [&str; 9] = [
    "q_a_proj.weight",
    "q_b_proj.weight",
    "q_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
];

/// Every tensor of the official layout, in checkpoint order.
fn tensor_specs(cfg: &DeepSeekConfig, fp8: Option<[usize; 2]>) -> Vec<Spec> {
    let mut specs = Vec::new();
    let (h, v, d) = (cfg.num_attention_heads, cfg.vocab_size, cfg.hidden_size);
    let lin = |specs: &mut Vec<Spec>, name: String, out: usize, inp: usize| {
        let std = 1.0 / (inp as f32).sqrt();
        match fp8 {
            Some(b) if FP8_SUFFIXES.iter().any(|s| name.ends_with(s)) => {
                let scale = vec![out.div_ceil(b[0]), inp.div_ceil(b[1])];
                specs.push(Spec {
                    name: format!("{name}_scale_inv"),
                    shape: scale,
                    init: Init::Normal(std),
                    stored: Stored::Scale,
                });
                specs.push(Spec { name, shape: vec![out, inp], init: Init::Normal(std), stored: Stored::Fp8 });
            }
            _ => specs.push(Spec { name, shape: vec![out, inp], init: Init::Normal(std), stored: Stored::Bf16 }),
        }
    };
    let norm = |specs: &mut Vec<Spec>, name: String, n: usize| {
        specs.push(Spec { name, shape: vec![n], init: Init::Norm, stored: Stored::Bf16 })
    };
    let head_std = 2.0 / (d as f32).sqrt();
    specs.push(Spec {
        name: "model.embed_tokens.weight".into(),
        shape: vec![v, d],
        init: Init::Normal(1.0),
        stored: Stored::Bf16,
    });
    let qk = cfg.qk_head_dim();
    let layers = cfg.num_hidden_layers + usize::from(cfg.has_mtp());
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        if l == cfg.num_hidden_layers {
            norm(&mut specs, format!("{p}enorm.weight"), d);
            norm(&mut specs, format!("{p}hnorm.weight"), d);
            specs.push(Spec {
                name: format!("{p}eh_proj.weight"),
                shape: vec![d, 2 * d],
                init: Init::Normal(1.0 / (2.0 * d as f32).sqrt()),
                stored: Stored::Bf16,
            });
            specs.push(Spec {
                name: format!("{p}embed_tokens.weight"),
                shape: vec![v, d],
                init: Init::Normal(1.0),
                stored: Stored::Bf16,
            });
            norm(&mut specs, format!("{p}shared_head.norm.weight"), d);
            specs.push(Spec {
                name: format!("{p}shared_head.head.weight"),
                shape: vec![v, d],
                init: Init::Normal(head_std),
                stored: Stored::Bf16,
            });
        }
        norm(&mut specs, format!("{p}input_layernorm.weight"), d);
        norm(&mut specs, format!("{p}post_attention_layernorm.weight"), d);
        let a = format!("{p}self_attn.");
        match cfg.q_lora_rank {
            Some(r) => {
                lin(&mut specs, format!("{a}q_a_proj.weight"), r, d);
                norm(&mut specs, format!("{a}q_a_layernorm.weight"), r);
                lin(&mut specs, format!("{a}q_b_proj.weight"), h * qk, r);
            }
            None => lin(&mut specs, format!("{a}q_proj.weight"), h * qk, d),
        }
        lin(&mut specs, format!("{a}kv_a_proj_with_mqa.weight"), cfg.kv_lora_rank + cfg.qk_rope_head_dim, d);
        norm(&mut specs, format!("{a}kv_a_layernorm.weight"), cfg.kv_lora_rank);
        lin(&mut specs, format!("{a}kv_b_proj.weight"), h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank);
        lin(&mut specs, format!("{a}o_proj.weight"), d, h * cfg.v_head_dim);
        let m = format!("{p}mlp.");
        if l >= cfg.num_hidden_layers || cfg.is_moe_layer(l) {
            let (e, i) = (cfg.n_routed_experts.unwrap_or(0), cfg.moe_intermediate_size);
            specs.push(Spec {
                name: format!("{m}gate.weight"),
                shape: vec![e, d],
                init: Init::Normal(head_std),
                stored: Stored::Bf16,
            });
            if cfg.topk_method == moeserve_core::TopkMethod::NoauxTc {
                specs.push(Spec {
                    name: format!("{m}gate.e_score_correction_bias"),
                    shape: vec![e],
                    init: Init::Bias,
                    stored: Stored::F32,
                });
            }
            for x in 0..e {
                lin(&mut specs, format!("{m}experts.{x}.gate_proj.weight"), i, d);
                lin(&mut specs, format!("{m}experts.{x}.up_proj.weight"), i, d);
                lin(&mut specs, format!("{m}experts.{x}.down_proj.weight"), d, i);
            }
            let s = i * cfg.n_shared_experts;
            if s > 0 {
                lin(&mut specs, format!("{m}shared_experts.gate_proj.weight"), s, d);
                lin(&mut specs, format!("{m}shared_experts.up_proj.weight"), s, d);
                lin(&mut specs, format!("{m}shared_experts.down_proj.weight"), d, s);
            }
        } else {
            lin(&mut specs, format!("{m}gate_proj.weight"), cfg.intermediate_size, d);
            lin(&mut specs, format!("{m}up_proj.weight"), cfg.intermediate_size, d);
            lin(&mut specs, format!("{m}down_proj.weight"), d, cfg.intermediate_size);
        }
    }
    norm(&mut specs, "model.norm.weight".into(), d);
    if !cfg.tie_word_embeddings {
        specs.push(Spec { name: "lm_head.weight".into(), shape: vec![v, d], init: Init::Normal(head_std), stored: Stored::Bf16 });
    }
    specs
}

/// Fast deterministic generator (splitmix64 seeded per tensor name).
struct Rng(u64);

impl Rng {
    fn for_tensor(seed: u64, name: &str) -> Self {
        let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
        }
        Rng(h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Approximately standard normal: sum of four 16-bit uniforms (Irwin–Hall), standardized.
    fn normal(&mut self) -> f32 {
        let r = self.next();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        (s as f32 / 65535.0 - 2.0) * 1.732_050_8
    }
}

fn values(spec: &Spec, seed: u64) -> Vec<f32> {
    let mut rng = Rng::for_tensor(seed, &spec.name);
    let n = spec.numel();
    match spec.init {
        Init::Normal(std) => (0..n).map(|_| half::bf16::from_f32(rng.normal() * std).to_f32()).collect(),
        Init::Norm => (0..n).map(|_| half::bf16::from_f32(1.0 + 0.1 * rng.normal()).to_f32()).collect(),
        Init::Bias => (0..n).map(|_| 2.0 + 0.15 * rng.normal()).collect(),
    }
}

/// FP8 quantization exactly like DeepSeek's: per block `scale = amax / 448`, `q = e4m3(w / scale)`.
fn quantize_fp8(w: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
    let (sr, sc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    let mut scales = vec![0f32; sr * sc];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / block[0]) * sc + c / block[1]];
            *s = s.max(w[r * cols + c].abs());
        }
    }
    scales.iter_mut().for_each(|s| *s = s.max(1e-12) / 448.0);
    let q = (0..rows * cols).map(|i| encode_e4m3(w[i] / scales[(i / cols / block[0]) * sc + (i % cols) / block[1]])).collect();
    (q, scales)
}

/// Bytes of one plain (bf16 / f32) tensor.
fn plain_bytes(spec: &Spec, seed: u64) -> Vec<u8> {
    match spec.stored {
        Stored::F32 => values(spec, seed).iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => values(spec, seed).iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
    }
}

/// Bytes of an FP8 weight's `weight_scale_inv` and of the weight itself (quantized once).
fn fp8_pair_bytes(weight: &Spec, seed: u64, block: [usize; 2]) -> (Vec<u8>, Vec<u8>) {
    let w = values(weight, seed);
    let (q, scales) = quantize_fp8(&w, weight.shape[0], weight.shape[1], block);
    (scales.iter().flat_map(|x| x.to_le_bytes()).collect(), q)
}

/// Write a random-weight checkpoint for `cfg` into `dir`.
pub fn write_checkpoint(cfg: &DeepSeekConfig, dir: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut cfg = cfg.clone();
    if let Some(b) = opts.fp8_block {
        cfg.quantization_config = Some(QuantizationConfig {
            quant_method: "fp8".into(),
            fmt: Some("e4m3".into()),
            weight_block_size: Some(b),
            activation_scheme: Some("dynamic".into()),
        });
    }
    let specs = tensor_specs(&cfg, opts.fp8_block);
    // shard boundaries: never split a scale from its weight
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut cur = 0usize;
    for s in &specs {
        let last = shards.last_mut().expect("non-empty");
        if cur + s.bytes() > opts.shard_bytes && !last.is_empty() && s.stored != Stored::Fp8 {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += s.bytes();
        shards.last_mut().expect("non-empty").push(s);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut report = SynthReport { files: Vec::new(), bytes: 0, params: 0 };
    for (i, shard) in shards.iter().enumerate() {
        let fname = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let path = dir.join(&fname);
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for s in shard {
            header.insert(s.name.clone(), json!({"dtype": s.dtype(), "shape": s.shape, "data_offsets": [off, off + s.bytes()]}));
            off += s.bytes();
            weight_map.insert(s.name.clone(), json!(fname));
            if s.stored != Stored::Scale {
                report.params += s.numel() as u64;
            }
        }
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut h = serde_json::to_vec(&header).map_err(|e| Error::Input(e.to_string()))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut f = BufWriter::new(File::create(&path).map_err(io(&path))?);
        f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io(&path))?;
        f.write_all(&h).map_err(io(&path))?;
        // units of one tensor, or a scale with its FP8 weight (always directly after it)
        let mut units: Vec<&[&Spec]> = Vec::new();
        let mut k = 0;
        while k < shard.len() {
            let n = match (shard[k].stored, shard.get(k + 1), opts.fp8_block) {
                (Stored::Scale, Some(w), Some(_)) if w.stored == Stored::Fp8 => 2,
                (Stored::Bf16 | Stored::F32, _, _) => 1,
                _ => return Err(Error::Input(format!("synth: {} is not paired with its FP8 weight", shard[k].name))),
            };
            units.push(&shard[k..k + n]);
            k += n;
        }
        // every tensor's values depend only on the seed and its name: generate a window of units
        // on all threads, then write them in order (memory stays bounded by the window)
        use rayon::prelude::*;
        for window in units.chunks(2 * rayon::current_num_threads()) {
            let chunks: Vec<Vec<Vec<u8>>> = window
                .par_iter()
                .map(|u| match (u, opts.fp8_block) {
                    ([_, w], Some(block)) => {
                        let (scale, q) = fp8_pair_bytes(w, opts.seed, block);
                        vec![scale, q]
                    }
                    _ => vec![plain_bytes(u[0], opts.seed)],
                })
                .collect();
            for (u, bytes) in window.iter().zip(chunks) {
                for (s, bytes) in u.iter().zip(bytes) {
                    debug_assert_eq!(bytes.len(), s.bytes(), "{}", s.name);
                    f.write_all(&bytes).map_err(io(&path))?;
                }
            }
        }
        f.flush().map_err(io(&path))?;
        report.bytes += (8 + h.len() + off) as u64;
        report.files.push(path);
    }
    let index = json!({"metadata": {"total_size": report.bytes}, "weight_map": weight_map});
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| Error::Input(e.to_string()))?;
        std::fs::write(&p, text).map_err(io(&p))
    };
    write_json("model.safetensors.index.json", &index)?;
    write_json("config.json", &cfg.to_json())?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids.first(), "do_sample": true, "temperature": 0.6, "top_p": 0.95}),
    )?;
    Ok(report)
}
