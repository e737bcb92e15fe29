//! Every tensor a DeepSeek V2/V3/R1 checkpoint holds, derived from its config alone: shape,
//! storage format in the checkpoint, weight class, and how tensor/expert parallelism splits it.
//!
//! Storage follows the official checkpoints (deepseek-v3-spec §2.5): with an FP8
//! `quantization_config`, every attention / MLP / expert projection is E4M3 with an f32
//! `weight_scale_inv` per block; embeddings, heads, norms, the router weight and the MTP
//! `eh_proj` are bf16; `e_score_correction_bias` is f32. Without one, everything is bf16 (the bias
//! stays f32).

use moeserve_core::{DeepSeekConfig, TopkMethod};
use moeserve_quant::{QuantSpec, TensorClass};

use crate::format::Format;

/// The classes the plan reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Embed,
    LmHead,
    /// q_a/q_b (or q_proj), kv_a, kv_b, o_proj and the q_a / kv_a norms.
    Attn,
    /// Decoder-layer norms, the final norm, the MTP enorm/hnorm/shared_head.norm.
    Norms,
    /// The MLP of the first_k_dense_replace layers.
    Dense,
    Shared,
    Experts,
    /// Router weight and e_score_correction_bias.
    Router,
    /// The MTP layer's eh_proj.
    EhProj,
}

impl Class {
    pub const ALL: [Class; 9] = [
        Class::Embed,
        Class::LmHead,
        Class::Attn,
        Class::Norms,
        Class::Dense,
        Class::Shared,
        Class::Experts,
        Class::Router,
        Class::EhProj,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Class::Embed => "embeddings",
            Class::LmHead => "lm_head",
            Class::Attn => "attention",
            Class::Norms => "norms",
            Class::Dense => "dense mlp",
            Class::Shared => "shared experts",
            Class::Experts => "routed experts",
            Class::Router => "router",
            Class::EhProj => "eh_proj",
        }
    }
}

/// How a tensor is divided over the ranks of a [`crate::Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it (q_a, kv_a, norms, router, eh_proj).
    Replicated,
    /// Output rows split over the attention TP group, whole heads per rank (q_b, kv_b, q_proj).
    HeadRows,
    /// Input columns split over the attention TP group, whole heads per rank (o_proj).
    HeadCols,
    /// Column-parallel over TP (dense MLP / shared expert gate and up).
    TpRows,
    /// Row-parallel over TP (their down projection).
    TpCols,
    /// Vocab-parallel over TP (embedding, lm_head): ceil(vocab / tp) rows per rank.
    Vocab,
    /// Routed experts: ceil(E / ep) experts per rank, each split over the expert-TP group by rows.
    ExpertRows,
    /// ... or by columns (down_proj).
    ExpertCols,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Name below `model.layers.N` (or the full top-level name), experts as `*`.
    pub name: String,
    pub class: Class,
    /// In the MTP (next-n) layer.
    pub mtp: bool,
    /// Layers that hold this tensor (1 for top-level tensors).
    pub layers: usize,
    /// Copies per layer (n_routed_experts for routed experts, else 1).
    pub per_layer: usize,
    pub shape: Vec<usize>,
    /// Format in the checkpoint.
    pub source: Format,
    /// The `--quant` class when the tensor goes behind the Linear seam.
    pub linear: Option<TensorClass>,
    pub split: Split,
    /// The loader reads it (false for the MTP layer's copy of the embedding: the main one is used).
    pub loaded: bool,
}

impl Entry {
    pub fn count(&self) -> u64 {
        (self.layers * self.per_layer) as u64
    }

    pub fn params(&self) -> u64 {
        self.count() * self.shape.iter().product::<usize>() as u64
    }

    pub fn source_bytes(&self) -> u64 {
        self.count() * self.source.bytes(&self.shape)
    }

    /// Tensors in the checkpoint, FP8 scale tensors included.
    pub fn tensor_files(&self) -> u64 {
        self.count() * if matches!(self.source, Format::Fp8 { .. }) { 2 } else { 1 }
    }

    /// The format the loader keeps it in: the `--quant` target of its class, else the checkpoint's;
    /// the router weight is always read as f32 (the router runs in f32).
    pub fn resident(&self, spec: &QuantSpec) -> Format {
        if self.class == Class::Router {
            return Format::F32;
        }
        match self.linear.and_then(|c| spec.target(c)) {
            Some(t) => Format::from_target(t),
            None => self.source,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Inventory {
    pub entries: Vec<Entry>,
}

struct Builder<'a> {
    cfg: &'a DeepSeekConfig,
    /// Format of the projections (FP8 or bf16).
    proj: Format,
    entries: Vec<Entry>,
}

impl Builder<'_> {
    #[allow(clippy::too_many_arguments)]
    fn push(&mut self, name: &str, class: Class, mtp: bool, layers: usize, shape: &[usize], source: Format, split: Split) {
        let linear = match class {
            Class::Attn if shape.len() == 2 => Some(TensorClass::Attn),
            Class::Dense => Some(TensorClass::Dense),
            Class::Shared => Some(TensorClass::Shared),
            Class::Experts => Some(TensorClass::Experts),
            Class::LmHead => Some(TensorClass::LmHead),
            Class::EhProj => Some(TensorClass::Other),
            _ => None,
        };
        let per_layer = if class == Class::Experts { self.cfg.n_routed_experts.unwrap_or(0) } else { 1 };
        if layers == 0 || per_layer == 0 {
            return;
        }
        self.entries.push(Entry {
            name: name.to_string(),
            class,
            mtp,
            layers,
            per_layer,
            shape: shape.to_vec(),
            source,
            linear,
            split,
            loaded: true,
        });
    }

    /// `layers` decoder blocks of one kind.
    fn block(&mut self, layers: usize, mtp: bool, moe: bool) {
        let c = self.cfg;
        let (d, h, p) = (c.hidden_size, c.num_attention_heads, self.proj);
        let (bf, qk) = (Format::Bf16, c.qk_head_dim());
        self.push("input_layernorm.weight", Class::Norms, mtp, layers, &[d], bf, Split::Replicated);
        self.push("post_attention_layernorm.weight", Class::Norms, mtp, layers, &[d], bf, Split::Replicated);
        let a = "self_attn.";
        match c.q_lora_rank {
            Some(r) => {
                self.push(&format!("{a}q_a_proj.weight"), Class::Attn, mtp, layers, &[r, d], p, Split::Replicated);
                self.push(&format!("{a}q_a_layernorm.weight"), Class::Attn, mtp, layers, &[r], bf, Split::Replicated);
                self.push(&format!("{a}q_b_proj.weight"), Class::Attn, mtp, layers, &[h * qk, r], p, Split::HeadRows);
            }
            None => self.push(&format!("{a}q_proj.weight"), Class::Attn, mtp, layers, &[h * qk, d], p, Split::HeadRows),
        }
        let (kvl, rope) = (c.kv_lora_rank, c.qk_rope_head_dim);
        self.push(&format!("{a}kv_a_proj_with_mqa.weight"), Class::Attn, mtp, layers, &[kvl + rope, d], p, Split::Replicated);
        self.push(&format!("{a}kv_a_layernorm.weight"), Class::Attn, mtp, layers, &[kvl], bf, Split::Replicated);
        let kv_b = [h * (c.qk_nope_head_dim + c.v_head_dim), kvl];
        self.push(&format!("{a}kv_b_proj.weight"), Class::Attn, mtp, layers, &kv_b, p, Split::HeadRows);
        self.push(&format!("{a}o_proj.weight"), Class::Attn, mtp, layers, &[d, h * c.v_head_dim], p, Split::HeadCols);
        let mlp = |s: &mut Self, prefix: &str, class: Class, width: usize, rows: Split, cols: Split| {
            s.push(&format!("{prefix}gate_proj.weight"), class, mtp, layers, &[width, d], p, rows);
            s.push(&format!("{prefix}up_proj.weight"), class, mtp, layers, &[width, d], p, rows);
            s.push(&format!("{prefix}down_proj.weight"), class, mtp, layers, &[d, width], p, cols);
        };
        match (moe, c.n_routed_experts) {
            (true, Some(e)) => {
                self.push("mlp.gate.weight", Class::Router, mtp, layers, &[e, d], bf, Split::Replicated);
                if c.topk_method == TopkMethod::NoauxTc {
                    self.push(
                        "mlp.gate.e_score_correction_bias",
                        Class::Router,
                        mtp,
                        layers,
                        &[e],
                        Format::F32,
                        Split::Replicated,
                    );
                }
                let im = c.moe_intermediate_size;
                mlp(self, "mlp.experts.*.", Class::Experts, im, Split::ExpertRows, Split::ExpertCols);
                if c.n_shared_experts > 0 {
                    mlp(self, "mlp.shared_experts.", Class::Shared, im * c.n_shared_experts, Split::TpRows, Split::TpCols);
                }
            }
            _ => mlp(self, "mlp.", Class::Dense, c.intermediate_size, Split::TpRows, Split::TpCols),
        }
    }
}

impl Inventory {
    pub fn from_config(cfg: &DeepSeekConfig) -> Self {
        let proj = match &cfg.quantization_config {
            Some(q) => Format::Fp8 { block: q.weight_block_size.unwrap_or([128, 128]) },
            None => Format::Bf16,
        };
        let mut b = Builder { cfg, proj, entries: Vec::new() };
        let (v, d, bf) = (cfg.vocab_size, cfg.hidden_size, Format::Bf16);
        // every rank keeps the whole table (on the CPU memory-mapped: only looked-up rows resident)
        b.push("model.embed_tokens.weight", Class::Embed, false, 1, &[v, d], bf, Split::Replicated);
        let moe_layers = (0..cfg.num_hidden_layers).filter(|&i| cfg.is_moe_layer(i)).count();
        b.block(cfg.num_hidden_layers - moe_layers, false, false);
        b.block(moe_layers, false, true);
        b.push("model.norm.weight", Class::Norms, false, 1, &[d], bf, Split::Replicated);
        if !cfg.tie_word_embeddings {
            b.push("lm_head.weight", Class::LmHead, false, 1, &[v, d], bf, Split::Vocab);
        }
        // MTP layers (model.layers.{num_hidden_layers + k}): a full decoder block (MoE when the
        // model has experts, as the loader builds it) plus the next-n extras
        let n = cfg.num_nextn_predict_layers;
        b.block(n, true, cfg.n_routed_experts.is_some());
        b.push("embed_tokens.weight", Class::Embed, true, n, &[v, d], bf, Split::Vocab);
        if let Some(e) = b.entries.last_mut().filter(|e| e.mtp && e.class == Class::Embed) {
            e.loaded = false;
        }
        b.push("enorm.weight", Class::Norms, true, n, &[d], bf, Split::Replicated);
        b.push("hnorm.weight", Class::Norms, true, n, &[d], bf, Split::Replicated);
        b.push("eh_proj.weight", Class::EhProj, true, n, &[d, 2 * d], bf, Split::Replicated);
        b.push("shared_head.norm.weight", Class::Norms, true, n, &[d], bf, Split::Replicated);
        b.push("shared_head.head.weight", Class::LmHead, true, n, &[v, d], bf, Split::Vocab);
        Inventory { entries: b.entries }
    }

    pub fn params(&self, mtp: Option<bool>) -> u64 {
        self.entries.iter().filter(|e| mtp.is_none_or(|m| e.mtp == m)).map(Entry::params).sum()
    }

    /// Bytes of the checkpoint files' tensor data.
    pub fn source_bytes(&self) -> u64 {
        self.entries.iter().map(Entry::source_bytes).sum()
    }

    pub fn tensor_files(&self) -> u64 {
        self.entries.iter().map(Entry::tensor_files).sum()
    }

    /// Checkpoint bytes of one class (`mtp`: only the MTP layer's, or only the main model's).
    pub fn class_source_bytes(&self, class: Class, mtp: bool) -> u64 {
        self.entries.iter().filter(|e| e.class == class && e.mtp == mtp).map(Entry::source_bytes).sum()
    }

    /// Formats the checkpoint stores, for display (`fp8 128x128 + bf16 + f32`).
    pub fn source_formats(&self) -> String {
        let mut f: Vec<Format> = self.entries.iter().map(|e| e.source).collect();
        f.sort();
        f.dedup();
        f.iter().rev().map(Format::name).collect::<Vec<_>>().join(" + ")
    }
}
