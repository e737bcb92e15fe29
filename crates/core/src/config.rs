//! `config.json` of the DeepSeek V2 / V3 / R1 family, parsed into typed dimensions.
//!
//! Field names are the Hugging Face names verbatim. Defaults follow transformers'
//! `DeepseekV2Config` / `DeepseekV3Config` for fields a checkpoint may omit; a field that is
//! required, of the wrong type or inconsistent gives an error naming it.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::{Error, KvLayout, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    DeepseekV2,
    DeepseekV3,
}

impl ModelType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelType::DeepseekV2 => "deepseek_v2",
            ModelType::DeepseekV3 => "deepseek_v3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over the scores.
    Greedy,
    /// V2: keep the `topk_group` groups with the largest single score, top-k inside them.
    GroupLimitedGreedy,
    /// V3/R1: bias-corrected scores, groups ranked by the sum of their top-2.
    NoauxTc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub fmt: Option<String>,
    /// `[rows, cols]` of one scale block (R1: `[128, 128]`).
    pub weight_block_size: Option<[usize; 2]>,
    pub activation_scheme: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeepSeekConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    /// `None` for a model without MoE layers.
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub quantization_config: Option<QuantizationConfig>,
}

/// Reads typed fields out of the JSON object and names the field in every error.
struct Fields<'a> {
    path: &'a str,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Config { path: self.path.to_string(), field: field.to_string(), msg: msg.into() }
    }

    fn present(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                // transformers writes some integers as floats (e.g. 4096.0)
                None => match v.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 => Ok(Some(f as usize)),
                    _ => Err(self.err(field, format!("expected a non-negative integer, found {v}"))),
                },
            },
        }
    }

    fn usize_req(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?.ok_or_else(|| self.err(field, "missing (required)"))
    }

    fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(field)?.unwrap_or(default))
    }

    fn positive(&self, field: &str) -> Result<usize> {
        let n = self.usize_req(field)?;
        if n == 0 {
            return Err(self.err(field, "must be > 0"));
        }
        Ok(n)
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected a boolean, found {v}"))),
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.present(field) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| self.err(field, format!("bad token id {v}"))))
                .collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(|| self.err(field, format!("bad token id {v}"))),
        }
    }
}

impl DeepSeekConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse `config.json` text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: origin.into(),
            field: "<json>".into(),
            msg: e.to_string(),
        })?;
        let obj = value.as_object().ok_or_else(|| Error::Config {
            path: origin.into(),
            field: "<root>".into(),
            msg: "not a JSON object".into(),
        })?;
        Self::from_fields(&Fields { path: origin, obj })
    }

    fn from_fields(f: &Fields) -> Result<Self> {
        let model_type = match f.str_opt("model_type")? {
            Some("deepseek_v3") => ModelType::DeepseekV3,
            Some("deepseek_v2") => ModelType::DeepseekV2,
            Some(other) => {
                return Err(f.err("model_type", format!("unsupported model type `{other}` (supported: deepseek_v3, deepseek_v2)")))
            }
            None => return Err(f.err("model_type", "missing (required)")),
        };
        let v3 = model_type == ModelType::DeepseekV3;

        let hidden_act = f.str_opt("hidden_act")?.unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(f.err("hidden_act", format!("unsupported activation `{hidden_act}` (only silu)")));
        }

        let n_routed_experts = f.usize_opt("n_routed_experts")?;
        let topk_method = match f.str_opt("topk_method")?.unwrap_or(if v3 { "noaux_tc" } else { "greedy" }) {
            // the V2 config class ships the misspelled default "gready"
            "greedy" | "gready" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => {
                return Err(f.err("topk_method", format!("unknown `{other}` (expected greedy, group_limited_greedy or noaux_tc)")))
            }
        };
        let scoring_func = match f.str_opt("scoring_func")?.unwrap_or(if v3 { "sigmoid" } else { "softmax" }) {
            "softmax" => ScoringFunc::Softmax,
            "sigmoid" => ScoringFunc::Sigmoid,
            other => return Err(f.err("scoring_func", format!("unknown `{other}` (expected softmax or sigmoid)"))),
        };

        let rope_scaling = match f.present("rope_scaling") {
            None => None,
            Some(Value::Object(o)) => Some(parse_rope_scaling(&Fields { path: f.path, obj: o })?),
            Some(v) => return Err(f.err("rope_scaling", format!("expected an object or null, found {v}"))),
        };
        let quantization_config = match f.present("quantization_config") {
            None => None,
            Some(Value::Object(o)) => Some(parse_quant(&Fields { path: f.path, obj: o })?),
            Some(v) => return Err(f.err("quantization_config", format!("expected an object, found {v}"))),
        };

        let q_lora_rank = f.usize_opt("q_lora_rank")?;
        if q_lora_rank == Some(0) {
            return Err(f.err("q_lora_rank", "must be null or > 0"));
        }

        let cfg = DeepSeekConfig {
            model_type,
            vocab_size: f.positive("vocab_size")?,
            hidden_size: f.positive("hidden_size")?,
            intermediate_size: f.positive("intermediate_size")?,
            moe_intermediate_size: if n_routed_experts.is_some() {
                f.positive("moe_intermediate_size")?
            } else {
                f.usize_or("moe_intermediate_size", 0)?
            },
            num_hidden_layers: f.positive("num_hidden_layers")?,
            num_attention_heads: f.positive("num_attention_heads")?,
            q_lora_rank,
            kv_lora_rank: f.positive("kv_lora_rank")?,
            qk_nope_head_dim: f.positive("qk_nope_head_dim")?,
            qk_rope_head_dim: f.positive("qk_rope_head_dim")?,
            v_head_dim: f.positive("v_head_dim")?,
            first_k_dense_replace: f.usize_or("first_k_dense_replace", 0)?,
            moe_layer_freq: f.usize_or("moe_layer_freq", 1)?,
            n_routed_experts,
            n_shared_experts: f.usize_or("n_shared_experts", 0)?,
            num_experts_per_tok: if n_routed_experts.is_some() { f.positive("num_experts_per_tok")? } else { 0 },
            n_group: f.usize_or("n_group", 1)?,
            topk_group: f.usize_or("topk_group", 1)?,
            topk_method,
            scoring_func,
            norm_topk_prob: f.bool_or("norm_topk_prob", v3)?,
            routed_scaling_factor: f.f64_or("routed_scaling_factor", 1.0)?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: f.f64_or("rope_theta", 10000.0)?,
            rope_scaling,
            max_position_embeddings: f.usize_or("max_position_embeddings", 4096)?,
            num_nextn_predict_layers: f.usize_or("num_nextn_predict_layers", 0)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: f.usize_opt("bos_token_id")?.map(|n| n as u32),
            eos_token_ids: f.token_ids("eos_token_id")?,
            quantization_config,
        };
        cfg.validate(f)?;
        Ok(cfg)
    }

    fn validate(&self, f: &Fields) -> Result<()> {
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(f.err("qk_rope_head_dim", "must be even (rope rotates pairs)"));
        }
        if self.moe_layer_freq == 0 {
            return Err(f.err("moe_layer_freq", "must be > 0"));
        }
        if let Some(e) = self.n_routed_experts {
            if e == 0 {
                return Err(f.err("n_routed_experts", "must be > 0 or null"));
            }
            if self.num_experts_per_tok > e {
                return Err(f.err("num_experts_per_tok", format!("{} > n_routed_experts {e}", self.num_experts_per_tok)));
            }
            if self.n_group == 0 || e % self.n_group != 0 {
                return Err(f.err("n_group", format!("{} does not divide n_routed_experts {e}", self.n_group)));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(f.err("topk_group", format!("{} not in 1..=n_group ({})", self.topk_group, self.n_group)));
            }
            let allowed = self.topk_group * (e / self.n_group);
            if self.topk_method != TopkMethod::Greedy && self.num_experts_per_tok > allowed {
                return Err(f.err(
                    "num_experts_per_tok",
                    format!("{} exceeds the {allowed} experts in topk_group groups", self.num_experts_per_tok),
                ));
            }
            if self.topk_method == TopkMethod::NoauxTc && e / self.n_group < 2 {
                return Err(f.err("n_group", "noaux_tc needs at least 2 experts per group"));
            }
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(f.err("rms_norm_eps", "must be > 0"));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(f.err("rope_theta", "must be > 0"));
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts.is_some() && layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq)
    }

    pub fn has_mtp(&self) -> bool {
        self.num_nextn_predict_layers > 0
    }

    /// Index of the MTP layer in the checkpoint (`model.layers.{num_hidden_layers}`).
    pub fn mtp_layer_index(&self) -> usize {
        self.num_hidden_layers
    }

    /// Attention softmax scale: `qk_head_dim^-1/2 · mscale(factor, mscale_all_dim)²`.
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            Some(r) if r.mscale_all_dim != 0.0 => {
                let m = yarn_get_mscale(r.factor, r.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }

    /// Layout of the main model's latent cache (the MTP layer keeps its own, one layer).
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout { num_layers: self.num_hidden_layers, latent_dim: self.kv_lora_rank, rope_dim: self.qk_rope_head_dim }
    }

    /// Bytes per token a conventional per-head K/V cache would take (K: qk_head_dim, V: v_head_dim).
    pub fn decompressed_kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        self.num_hidden_layers * self.num_attention_heads * (self.qk_head_dim() + self.v_head_dim) * elem_bytes
    }

    /// Serialize back to the Hugging Face `config.json` form (used by `moeserve synth`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "architectures": [match self.model_type {
                ModelType::DeepseekV3 => "DeepseekV3ForCausalLM",
                ModelType::DeepseekV2 => "DeepseekV2ForCausalLM",
            }],
            "model_type": self.model_type.as_str(),
            "attention_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": if self.eos_token_ids.len() == 1 { json!(self.eos_token_ids[0]) } else { json!(self.eos_token_ids) },
            "first_k_dense_replace": self.first_k_dense_replace,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "kv_lora_rank": self.kv_lora_rank,
            "max_position_embeddings": self.max_position_embeddings,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_layer_freq": self.moe_layer_freq,
            "n_group": self.n_group,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "norm_topk_prob": self.norm_topk_prob,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_attention_heads,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": match self.scoring_func { ScoringFunc::Sigmoid => "sigmoid", ScoringFunc::Softmax => "softmax" },
            "tie_word_embeddings": self.tie_word_embeddings,
            "topk_group": self.topk_group,
            "topk_method": match self.topk_method {
                TopkMethod::Greedy => "greedy",
                TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
                TopkMethod::NoauxTc => "noaux_tc",
            },
            "torch_dtype": "bfloat16",
            "v_head_dim": self.v_head_dim,
            "vocab_size": self.vocab_size,
        });
        if let Some(r) = &self.rope_scaling {
            v["rope_scaling"] = json!({
                "type": "yarn", "factor": r.factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
            });
        }
        if let Some(q) = &self.quantization_config {
            v["quantization_config"] = json!({
                "quant_method": q.quant_method, "fmt": q.fmt,
                "activation_scheme": q.activation_scheme, "weight_block_size": q.weight_block_size,
            });
        }
        v
    }
}

/// YaRN's magnitude correction `0.1 · mscale · ln(factor) + 1` (1 when factor ≤ 1).
pub fn yarn_get_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

fn parse_rope_scaling(f: &Fields) -> Result<RopeScaling> {
    let kind = f.str_opt("type")?.or(f.str_opt("rope_type")?).unwrap_or("yarn");
    if kind != "yarn" {
        return Err(f.err("rope_scaling.type", format!("unsupported rope scaling `{kind}` (only yarn)")));
    }
    let factor = f.f64_or("factor", f64::NAN)?;
    if factor.is_nan() || factor < 1.0 {
        return Err(f.err("rope_scaling.factor", "missing or < 1"));
    }
    Ok(RopeScaling {
        factor,
        original_max_position_embeddings: f
            .usize_opt("original_max_position_embeddings")?
            .ok_or_else(|| f.err("rope_scaling.original_max_position_embeddings", "missing (required for yarn)"))?,
        beta_fast: f.f64_or("beta_fast", 32.0)?,
        beta_slow: f.f64_or("beta_slow", 1.0)?,
        mscale: f.f64_or("mscale", 1.0)?,
        mscale_all_dim: f.f64_or("mscale_all_dim", 0.0)?,
    })
}

fn parse_quant(f: &Fields) -> Result<QuantizationConfig> {
    let quant_method =
        f.str_opt("quant_method")?.ok_or_else(|| f.err("quantization_config.quant_method", "missing"))?.to_string();
    let fmt = f.str_opt("fmt")?.map(str::to_string);
    if quant_method != "fp8" {
        return Err(f.err("quantization_config.quant_method", format!("unsupported `{quant_method}` (supported: fp8)")));
    }
    if let Some(fm) = &fmt {
        if fm != "e4m3" {
            return Err(f.err("quantization_config.fmt", format!("unsupported `{fm}` (supported: e4m3)")));
        }
    }
    let weight_block_size = match f.present("weight_block_size") {
        None => None,
        Some(Value::Array(a)) if a.len() == 2 => {
            let dims: Vec<usize> = a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect();
            if dims.len() != 2 || dims.contains(&0) {
                return Err(
                    f.err("quantization_config.weight_block_size", format!("expected two positive integers, found {a:?}"))
                );
            }
            Some([dims[0], dims[1]])
        }
        Some(v) => return Err(f.err("quantization_config.weight_block_size", format!("expected [rows, cols], found {v}"))),
    };
    Ok(QuantizationConfig {
        quant_method,
        fmt,
        weight_block_size,
        activation_scheme: f.str_opt("activation_scheme")?.map(str::to_string),
    })
}

#[cfg(test)]
mod tests;
