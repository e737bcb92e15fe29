//! llama.cpp GGUF files of the `deepseek2` architecture (DeepSeek V2/V3/R1), single or split
//! (`*-00001-of-0000N.gguf`), read as a [`Checkpoint`] with our tensor names: the ggml blocks
//! stay as stored (q8_0 / q4_K / q6_K go straight to the CPU kernels), the packed expert tensors
//! (`ffn_*_exps`) are split per expert without copying, and the split `attn_k_b` / `attn_v_b`
//! form is joined back into `kv_b_proj` (the older fused `attn_kv_b` maps directly). The model
//! config comes from the `deepseek2.*` metadata.
//!
//! [`export`] writes such a file from a safetensors checkpoint (llama.cpp's converter layout);
//! the tests use it to check that a llama.cpp-produced layout loads.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use moeserve_core::config::ScoringFunc;
use moeserve_core::{DeepSeekConfig, Error, Result};
use safetensors::Dtype;
use serde_json::{json, Map};

use crate::checkpoint::{Backing, Checkpoint, Shard, Slice, TensorMeta};

pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::CheckpointFile { file: path.to_path_buf(), msg: msg.into() }
}

/// The files of a (possibly split) GGUF model, given any one of them.
fn split_files(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // NAME-00001-of-00003.gguf
    let parts: Option<(String, usize)> = (|| {
        let stem = name.strip_suffix(".gguf")?;
        let (head, total) = stem.rsplit_once("-of-")?;
        let (prefix, _) = head.rsplit_once('-')?;
        Some((prefix.to_string(), total.parse().ok()?))
    })();
    match parts {
        Some((prefix, total)) => {
            let width = name.rsplit_once("-of-").map_or(5, |(_, t)| t.len() - ".gguf".len());
            (1..=total).map(|i| path.with_file_name(format!("{prefix}-{i:0width$}-of-{total:0width$}.gguf"))).collect()
        }
        None => vec![path.to_path_buf()],
    }
}

/// Model-level tensors: (llama.cpp, ours).
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer tensors: (llama.cpp leaf after `blk.N.`, ours after `model.layers.N.`).
const LAYER_NAMES: [(&str, &str); 24] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"),
    ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("ffn_gate_inp.weight", "mlp.gate.weight"),
    ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight"),
    ("nextn.eh_proj.weight", "eh_proj.weight"),
    ("nextn.enorm.weight", "enorm.weight"),
    ("nextn.hnorm.weight", "hnorm.weight"),
    ("nextn.embed_tokens.weight", "embed_tokens.weight"),
    ("nextn.shared_head_head.weight", "shared_head.head.weight"),
    ("nextn.shared_head_norm.weight", "shared_head.norm.weight"),
];

/// Our name for a llama.cpp tensor name (None: not used, or handled separately).
fn map_name(name: &str) -> Option<String> {
    if let Some((_, ours)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == name) {
        return Some(ours.to_string());
    }
    let (layer, leaf) = name.strip_prefix("blk.")?.split_once('.')?;
    let (_, ours) = LAYER_NAMES.iter().find(|(g, _)| *g == leaf)?;
    Some(format!("model.layers.{layer}.{ours}"))
}

const EXPERT_TENSORS: [(&str, &str); 3] =
    [("ffn_gate_exps.weight", "gate_proj"), ("ffn_up_exps.weight", "up_proj"), ("ffn_down_exps.weight", "down_proj")];

fn plain_dtype(q: GgmlDType) -> Option<Dtype> {
    match q {
        GgmlDType::F32 => Some(Dtype::F32),
        GgmlDType::F16 => Some(Dtype::F16),
        GgmlDType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

fn meta_for(q: GgmlDType, shape: Vec<usize>, bytes: std::ops::Range<usize>) -> TensorMeta {
    match plain_dtype(q) {
        Some(dtype) => TensorMeta { dtype, shape, bytes, ggml: None },
        None => TensorMeta { dtype: Dtype::U8, shape, bytes, ggml: Some(q) },
    }
}

/// Open a GGUF model: the checkpoint (our names) and its config.
pub fn open(path: &Path) -> Result<(Checkpoint, DeepSeekConfig)> {
    let files = split_files(path);
    let mut shards = Vec::new();
    let mut metadata: HashMap<String, Value> = HashMap::new();
    // (layer, which) -> (shard, meta) of the split k_b / v_b form
    let mut split_kv: HashMap<String, [Option<(usize, TensorMeta)>; 2]> = HashMap::new();
    for f in &files {
        let mut file = File::open(f).map_err(|e| file_err(f, format!("cannot open GGUF file: {e}")))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| file_err(f, format!("not a readable GGUF file: {e}")))?;
        // SAFETY: model files are treated as read-only for the process lifetime.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| file_err(f, e.to_string()))?;
        let base = content.tensor_data_offset as usize;
        let mut tensors = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let q = info.ggml_dtype;
            let dims = info.shape.dims().to_vec();
            let elems: usize = dims.iter().product();
            let size = elems / q.block_size() * q.type_size();
            let start = base + info.offset as usize;
            if start + size > mmap.len() {
                return Err(Error::Tensor {
                    file: f.clone(),
                    tensor: name.clone(),
                    msg: format!("file is truncated: tensor data ends at byte {} of {}", start + size, mmap.len()),
                });
            }
            let leaf = name.split_once('.').and_then(|(_, r)| r.split_once('.')).map(|(_, l)| l);
            if let (Some(layer), Some(leaf)) = (name.strip_prefix("blk.").and_then(|r| r.split('.').next()), leaf) {
                if let Some((_, ours)) = EXPERT_TENSORS.iter().find(|(g, _)| *g == leaf) {
                    let [n, rows, cols] = dims[..] else {
                        return Err(Error::Tensor {
                            file: f.clone(),
                            tensor: name.clone(),
                            msg: format!("expected 3-D experts, found {dims:?}"),
                        });
                    };
                    let per = size / n.max(1);
                    for e in 0..n {
                        let ours = format!("model.layers.{layer}.mlp.experts.{e}.{ours}.weight");
                        tensors.insert(ours, meta_for(q, vec![rows, cols], start + e * per..start + (e + 1) * per));
                    }
                    continue;
                }
                if leaf == "attn_k_b.weight" || leaf == "attn_v_b.weight" {
                    let slot = (leaf == "attn_v_b.weight") as usize;
                    split_kv.entry(layer.to_string()).or_default()[slot] =
                        Some((shards.len(), meta_for(q, dims.clone(), start..start + size)));
                    continue;
                }
            }
            if let Some(ours) = map_name(name) {
                tensors.insert(ours, meta_for(q, dims, start..start + size));
            }
        }
        metadata.extend(content.metadata);
        shards.push(Shard { path: f.clone(), mmap: Backing::Mmap(mmap), tensors });
    }
    let cfg = config_from_metadata(&metadata, path)?;
    if !split_kv.is_empty() {
        let joined = join_kv_b(path, &shards, split_kv, &cfg)?;
        shards.push(joined);
    }
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok((Checkpoint::from_shards(&dir, shards), cfg))
}

/// `kv_b_proj [H·(nope+v), kv_lora]` from llama.cpp's `attn_k_b [H, kv_lora, nope]` (stored
/// transposed per head) and `attn_v_b [H, v, kv_lora]`, in f32.
fn join_kv_b(
    path: &Path,
    shards: &[Shard],
    split: HashMap<String, [Option<(usize, TensorMeta)>; 2]>,
    cfg: &DeepSeekConfig,
) -> Result<Shard> {
    let (h, nope, v, lora) = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let mut data: Vec<u8> = Vec::new();
    let mut tensors = HashMap::new();
    let mut layers: Vec<_> = split.into_iter().collect();
    layers.sort_by(|a, b| a.0.cmp(&b.0));
    for (layer, parts) in layers {
        let [Some(kb), Some(vb)] = parts else {
            return Err(file_err(path, format!("layer {layer}: attn_k_b without attn_v_b (or the reverse)")));
        };
        let load = |(s, m): &(usize, TensorMeta), want: [usize; 3], what: &str| -> Result<Vec<f32>> {
            let name = format!("blk.{layer}.{what}");
            if m.shape != want {
                return Err(Error::Shape {
                    file: shards[*s].path.clone(),
                    tensor: name,
                    expected: want.to_vec(),
                    found: m.shape.clone(),
                });
            }
            let tmp = Checkpoint::from_shards(
                path,
                vec![Shard {
                    path: shards[*s].path.clone(),
                    mmap: Backing::Owned(shards[*s].mmap[m.bytes.clone()].to_vec()),
                    tensors: HashMap::from([(name.clone(), TensorMeta { bytes: 0..m.bytes.len(), ..m.clone() })]),
                }],
            );
            let t = tmp.load(&name, &Slice::full(), DType::F32, &Device::Cpu)?;
            t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| file_err(path, format!("{name}: {e}")))
        };
        let k = load(&kb, [h, lora, nope], "attn_k_b.weight")?; // [h][lora][nope]
        let vv = load(&vb, [h, v, lora], "attn_v_b.weight")?; // [h][v][lora]
        let mut kv = vec![0f32; h * (nope + v) * lora];
        for hh in 0..h {
            let base = hh * (nope + v) * lora;
            for n in 0..nope {
                for l in 0..lora {
                    kv[base + n * lora + l] = k[(hh * lora + l) * nope + n];
                }
            }
            kv[base + nope * lora..base + (nope + v) * lora].copy_from_slice(&vv[hh * v * lora..(hh + 1) * v * lora]);
        }
        let start = data.len();
        data.extend(kv.iter().flat_map(|x| x.to_le_bytes()));
        tensors.insert(
            format!("model.layers.{layer}.self_attn.kv_b_proj.weight"),
            TensorMeta { dtype: Dtype::F32, shape: vec![h * (nope + v), lora], bytes: start..data.len(), ggml: None },
        );
    }
    Ok(Shard { path: path.to_path_buf(), mmap: Backing::Owned(data), tensors })
}

fn config_from_metadata(md: &HashMap<String, Value>, path: &Path) -> Result<DeepSeekConfig> {
    let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if arch != "deepseek2" {
        return Err(file_err(path, format!("GGUF architecture `{arch}`: only `deepseek2` (DeepSeek V2/V3/R1) is supported")));
    }
    let key = |k: &str| format!("deepseek2.{k}");
    let num = |k: &str| md.get(&key(k)).and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)));
    let float = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok().or_else(|| v.to_f64().ok().map(|x| x as f32)));
    let need = |k: &str| num(k).ok_or_else(|| file_err(path, format!("GGUF metadata `deepseek2.{k}` missing")));
    let heads = need("attention.head_count")?;
    let rope = need("rope.dimension_count")?;
    let key_len = num("attention.key_length_mla")
        .or(num("attention.key_length"))
        .ok_or_else(|| file_err(path, "GGUF metadata `deepseek2.attention.key_length` missing"))?;
    let v_len = num("attention.value_length_mla")
        .or(num("attention.value_length"))
        .ok_or_else(|| file_err(path, "GGUF metadata `deepseek2.attention.value_length` missing"))?;
    let gating = num("expert_gating_func").unwrap_or(1); // 1 softmax, 2 sigmoid
    let v3 = gating == 2 || md.contains_key(&key("expert_group_count"));
    let n_group = num("expert_group_count").unwrap_or(1);
    let vocab = num("vocab_size")
        .or_else(|| md.get("tokenizer.ggml.tokens").and_then(|t| t.to_vec().ok()).map(|t| t.len() as u64))
        .ok_or_else(|| file_err(path, "GGUF metadata: no vocab_size and no tokenizer.ggml.tokens"))?;
    let mut c = Map::new();
    c.insert("model_type".into(), json!(if v3 { "deepseek_v3" } else { "deepseek_v2" }));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("hidden_size".into(), json!(need("embedding_length")?));
    c.insert("intermediate_size".into(), json!(need("feed_forward_length")?));
    c.insert("moe_intermediate_size".into(), json!(num("expert_feed_forward_length").unwrap_or(0)));
    c.insert("num_hidden_layers".into(), json!(need("block_count")? - num("nextn_predict_layers").unwrap_or(0)));
    c.insert("num_nextn_predict_layers".into(), json!(num("nextn_predict_layers").unwrap_or(0)));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(heads));
    c.insert("n_shared_experts".into(), json!(num("expert_shared_count").unwrap_or(0)));
    c.insert("n_routed_experts".into(), json!(num("expert_count")));
    c.insert("num_experts_per_tok".into(), json!(num("expert_used_count")));
    c.insert("routed_scaling_factor".into(), json!(float("expert_weights_scale").unwrap_or(1.0)));
    c.insert("norm_topk_prob".into(), json!(md.get(&key("expert_weights_norm")).and_then(|v| v.to_bool().ok()).unwrap_or(v3)));
    c.insert("scoring_func".into(), json!(if gating == 2 { "sigmoid" } else { "softmax" }));
    c.insert(
        "topk_method".into(),
        json!(if v3 {
            "noaux_tc"
        } else if n_group > 1 {
            "group_limited_greedy"
        } else {
            "greedy"
        }),
    );
    c.insert("n_group".into(), json!(n_group));
    c.insert("topk_group".into(), json!(num("expert_group_used_count").unwrap_or(1)));
    c.insert("first_k_dense_replace".into(), json!(num("leading_dense_block_count").unwrap_or(0)));
    c.insert("moe_layer_freq".into(), json!(1));
    c.insert("kv_lora_rank".into(), json!(need("attention.kv_lora_rank")?));
    c.insert("q_lora_rank".into(), num("attention.q_lora_rank").filter(|&r| r > 0).map_or(json!(null), |r| json!(r)));
    c.insert("qk_rope_head_dim".into(), json!(rope));
    c.insert("qk_nope_head_dim".into(), json!(key_len.saturating_sub(rope)));
    c.insert("v_head_dim".into(), json!(v_len));
    c.insert("rms_norm_eps".into(), json!(float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6)));
    c.insert("rope_theta".into(), json!(float("rope.freq_base").unwrap_or(10000.0)));
    c.insert("max_position_embeddings".into(), json!(need("context_length")?));
    c.insert("tie_word_embeddings".into(), json!(false));
    if md.get(&key("rope.scaling.type")).and_then(|v| v.to_string().ok()).is_some_and(|t| t == "yarn") {
        // llama.cpp stores yarn_log_multiplier = 0.1 · mscale_all_dim and uses beta 32 / 1
        let mscale = float("rope.scaling.yarn_log_multiplier").map_or(1.0, |m| m / 0.1);
        c.insert(
            "rope_scaling".into(),
            json!({
                "type": "yarn",
                "factor": float("rope.scaling.factor").unwrap_or(1.0),
                "original_max_position_embeddings": num("rope.scaling.original_context_length"),
                "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale,
            }),
        );
    }
    for (ours, theirs) in [("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")] {
        if let Some(v) = md.get(theirs).and_then(|v| v.to_u32().ok()) {
            c.insert(ours.into(), json!(v));
        }
    }
    DeepSeekConfig::from_json_str(&serde_json::Value::Object(c).to_string(), &format!("{} (GGUF metadata)", path.display()))
}

/// How [`export`] lays out the attention's kv_b projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvB {
    /// The older fused `attn_kv_b`.
    Fused,
    /// llama.cpp's current `attn_k_b` + `attn_v_b`.
    Split,
}

/// Write `dir`'s safetensors checkpoint as a llama.cpp-layout `deepseek2` GGUF: 2-D projections
/// in `quant` (q8_0 / q4_K / q6_K need whole blocks per row; others stay f32), the experts packed
/// per layer, norms, router and embeddings in f32. Test support; not a full converter (no
/// embedded tokenizer).
pub fn export(dir: &Path, out: &Path, quant: GgmlDType, kv_b: KvB) -> Result<()> {
    let cfg = DeepSeekConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir)?;
    let cpu = Device::Cpu;
    let err = |e: candle_core::Error| file_err(out, e.to_string());
    let load = |name: &str| -> Result<Tensor> {
        let meta = ckpt.meta(name)?;
        if meta.dtype == Dtype::F8_E4M3 {
            return ckpt.load_fp8(name, &format!("{name}_scale_inv"), [128, 128], &Slice::full(), DType::F32, &cpu);
        }
        ckpt.load(name, &Slice::full(), DType::F32, &cpu)
    };
    let quantize = |t: &Tensor, matrix: bool| -> Result<QTensor> {
        let cols = t.dims().last().copied().unwrap_or(0);
        let q = if matrix && cols % quant.block_size() == 0 { quant } else { GgmlDType::F32 };
        QTensor::quantize(t, q).map_err(err)
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&str> = ckpt.tensor_names().filter(|n| !n.ends_with("_scale_inv")).collect();
    names.sort();
    let reverse: HashMap<String, String> = names
        .iter()
        .filter_map(|n| {
            let g = gguf_name(n)?;
            Some((n.to_string(), g))
        })
        .collect();
    for (layer, _) in (0..cfg.num_hidden_layers).map(|l| (l, ())) {
        if let Some(n) = cfg.n_routed_experts.filter(|_| cfg.is_moe_layer(layer)) {
            for (g, ours) in EXPERT_TENSORS {
                let per: Vec<Tensor> = (0..n)
                    .map(|e| load(&format!("model.layers.{layer}.mlp.experts.{e}.{ours}.weight")))
                    .collect::<Result<_>>()?;
                let packed = Tensor::stack(&per, 0).map_err(err)?;
                tensors.push((format!("blk.{layer}.{g}"), quantize(&packed, true)?));
            }
        }
        let kvb = format!("model.layers.{layer}.self_attn.kv_b_proj.weight");
        if kv_b == KvB::Split {
            let (h, nope, v, lora) = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
            let w = load(&kvb)?.reshape((h, nope + v, lora)).map_err(err)?;
            let k_b = w.narrow(1, 0, nope).and_then(|k| k.transpose(1, 2)).and_then(|k| k.contiguous()).map_err(err)?;
            let v_b = w.narrow(1, nope, v).and_then(|v| v.contiguous()).map_err(err)?;
            tensors.push((format!("blk.{layer}.attn_k_b.weight"), quantize(&k_b, true)?));
            tensors.push((format!("blk.{layer}.attn_v_b.weight"), quantize(&v_b, true)?));
        }
    }
    for n in names {
        if n.contains(".mlp.experts.") || (kv_b == KvB::Split && n.ends_with("kv_b_proj.weight")) {
            continue;
        }
        let Some(g) = reverse.get(n) else { continue };
        let t = load(n)?;
        let matrix = t.rank() == 2 && !n.contains("embed_tokens") && !n.ends_with("mlp.gate.weight");
        tensors.push((g.clone(), quantize(&t, matrix)?));
    }
    let md = metadata_for(&cfg);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = File::create(out).map_err(|e| file_err(out, e.to_string()))?;
    gguf_file::write(&mut f, &md_refs, &t_refs).map_err(err)
}

/// llama.cpp's name for one of ours (the inverse of [`map_name`]).
fn gguf_name(ours: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, o)| *o == ours) {
        return Some(g.to_string());
    }
    let (layer, leaf) = ours.strip_prefix("model.layers.")?.split_once('.')?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, o)| *o == leaf)?;
    Some(format!("blk.{layer}.{g}"))
}

fn metadata_for(c: &DeepSeekConfig) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        ("general.architecture".to_string(), Value::String("deepseek2".into())),
        ("deepseek2.block_count".into(), u(c.num_hidden_layers + c.num_nextn_predict_layers)),
        ("deepseek2.nextn_predict_layers".into(), u(c.num_nextn_predict_layers)),
        ("deepseek2.context_length".into(), u(c.max_position_embeddings)),
        ("deepseek2.embedding_length".into(), u(c.hidden_size)),
        ("deepseek2.feed_forward_length".into(), u(c.intermediate_size)),
        ("deepseek2.attention.head_count".into(), u(c.num_attention_heads)),
        ("deepseek2.attention.head_count_kv".into(), u(c.num_attention_heads)),
        ("deepseek2.rope.freq_base".into(), Value::F32(c.rope_theta as f32)),
        ("deepseek2.attention.layer_norm_rms_epsilon".into(), Value::F32(c.rms_norm_eps as f32)),
        ("deepseek2.expert_used_count".into(), u(c.num_experts_per_tok)),
        ("deepseek2.leading_dense_block_count".into(), u(c.first_k_dense_replace)),
        ("deepseek2.vocab_size".into(), u(c.vocab_size)),
        ("deepseek2.attention.kv_lora_rank".into(), u(c.kv_lora_rank)),
        ("deepseek2.attention.key_length".into(), u(c.qk_nope_head_dim + c.qk_rope_head_dim)),
        ("deepseek2.attention.value_length".into(), u(c.v_head_dim)),
        ("deepseek2.rope.dimension_count".into(), u(c.qk_rope_head_dim)),
        ("deepseek2.expert_feed_forward_length".into(), u(c.moe_intermediate_size)),
        ("deepseek2.expert_count".into(), u(c.n_routed_experts.unwrap_or(0))),
        ("deepseek2.expert_shared_count".into(), u(c.n_shared_experts)),
        ("deepseek2.expert_weights_scale".into(), Value::F32(c.routed_scaling_factor as f32)),
        ("deepseek2.expert_weights_norm".into(), Value::Bool(c.norm_topk_prob)),
        ("deepseek2.expert_gating_func".into(), u(if c.scoring_func == ScoringFunc::Sigmoid { 2 } else { 1 })),
        ("deepseek2.expert_group_count".into(), u(c.n_group)),
        ("deepseek2.expert_group_used_count".into(), u(c.topk_group)),
    ];
    if let Some(q) = c.q_lora_rank {
        md.push(("deepseek2.attention.q_lora_rank".into(), u(q)));
    }
    if let Some(r) = &c.rope_scaling {
        md.push(("deepseek2.rope.scaling.type".into(), Value::String("yarn".into())));
        md.push(("deepseek2.rope.scaling.factor".into(), Value::F32(r.factor as f32)));
        md.push(("deepseek2.rope.scaling.original_context_length".into(), u(r.original_max_position_embeddings)));
        md.push(("deepseek2.rope.scaling.yarn_log_multiplier".into(), Value::F32(0.1 * r.mscale_all_dim as f32)));
    }
    if let Some(b) = c.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), u(b as usize)));
    }
    if let Some(&e) = c.eos_token_ids.first() {
        md.push(("tokenizer.ggml.eos_token_id".into(), u(e as usize)));
    }
    md
}

/// Split a GGUF file into `n` files `{prefix}-0000i-of-0000n.gguf` (tensors spread over them,
/// metadata in each, as llama.cpp's `gguf-split` does). Test support.
pub fn split(src: &Path, prefix: &Path, n: usize) -> Result<()> {
    let err = |e: candle_core::Error| file_err(src, e.to_string());
    let mut f = File::open(src).map_err(|e| file_err(src, e.to_string()))?;
    let content = gguf_file::Content::read(&mut f).map_err(err)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(&String, QTensor)> =
        names.iter().map(|&name| Ok((name, content.tensor(&mut f, name, &Device::Cpu).map_err(err)?))).collect::<Result<_>>()?;
    let n = n.max(1);
    for i in 0..n {
        let mut md: Vec<(String, Value)> = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        md.push(("split.no".into(), Value::U16(i as u16)));
        md.push(("split.count".into(), Value::U16(n as u16)));
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let part: Vec<(&str, &QTensor)> = tensors.iter().skip(i).step_by(n).map(|(k, t)| (k.as_str(), t)).collect();
        let name = format!("{}-{:05}-of-{n:05}.gguf", prefix.file_name().map(|s| s.to_string_lossy()).unwrap_or_default(), i + 1);
        let out = prefix.with_file_name(name);
        let mut w = File::create(&out).map_err(|e| file_err(&out, e.to_string()))?;
        gguf_file::write(&mut w, &md_refs, &part).map_err(err)?;
    }
    Ok(())
}
