//! Memory per rank for one layout: weights, the latent KV cache, and a reserve for activations,
//! logits and the runtime; from what is left, how many sequences of `context` tokens fit.
//!
//! Reserve per rank (bytes), with `T` = max batched tokens, `a` = compute dtype bytes, `D` =
//! hidden, `Hr` = heads per rank, `k` = experts per token:
//! ```text
//! activations = T · a · (ACT_HIDDEN_BUFFERS · D                       residual, norms, attn/moe outputs, all-reduce
//!                        + 2 · max(I/tp, I_shared/tp, k · I_moe/moe_tp)  gate+up of the widest MLP (all k routed
//!                                                                         pairs of the batch may land on one rank)
//!                        + Hr · (2 · qk_head_dim + 2 · v_head_dim)    q, decompressed k, v and output in prefill
//!                        + [ep > 1] · 2 · k · D)                      all-to-all dispatch + combine buffers
//! logits      = LOGIT_BUFFERS · max_seqs · vocab · 4                  f32 logits (all-gathered to the full vocab)
//!                                                                     and the sampling probabilities
//! fixed       = 2 GiB per GPU (CUDA context ≈ 0.5 GiB, cuBLAS workspaces, NCCL channel buffers,
//!               allocator slack), 1 GiB on a CPU host
//! ```
//! Attention is assumed to run a fused (flash-style) kernel: no `T × context` score matrix.
//! Usable memory is `utilization × device memory` (default 0.90, like vLLM's
//! `gpu_memory_utilization`); the KV cache gets what usable memory leaves after weights and
//! reserve.

use moeserve_core::DeepSeekConfig;
use moeserve_quant::QuantSpec;

use crate::format::Format;
use crate::hardware::{DeviceKind, Hardware};
use crate::inventory::{Class, Inventory};
use crate::layout::Layout;

pub const GIB: u64 = 1 << 30;
pub const GPU_FIXED_OVERHEAD: u64 = 2 * GIB;
pub const CPU_FIXED_OVERHEAD: u64 = GIB;
pub const ACT_HIDDEN_BUFFERS: u64 = 8;
pub const LOGIT_BUFFERS: u64 = 2;
pub const DEFAULT_UTILIZATION: f64 = 0.90;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Resident formats (`--quant`); default keeps the checkpoint's.
    pub spec: QuantSpec,
    /// Tokens per sequence the plan must hold.
    pub context: usize,
    /// Tokens per KV page (the engine's `--page-size`).
    pub page_size: usize,
    /// Bytes of the compute dtype: activations and KV pages (the engine allocates pages in the
    /// model's dtype): 2 for bf16, 4 for f32.
    pub dtype_bytes: usize,
    /// Load the MTP layer (speculative decoding): its weights and one more KV layer.
    pub mtp: bool,
    pub max_batch_tokens: usize,
    /// Running sequences per engine (sizes the logits buffers).
    pub max_seqs: usize,
    /// Sequences a layout must hold at `context` to count as fitting.
    pub require_seqs: u64,
    pub utilization: f64,
    pub fixed_overhead: u64,
}

impl PlanOptions {
    /// The defaults of `moeserve serve` on this hardware: bf16 on GPUs, f32 on a CPU host.
    pub fn for_hardware(hw: &Hardware) -> Self {
        let cpu = hw.kind == DeviceKind::Cpu;
        PlanOptions {
            spec: QuantSpec::default(),
            context: 131072,
            page_size: 16,
            dtype_bytes: if cpu { 4 } else { 2 },
            mtp: false,
            max_batch_tokens: 512,
            max_seqs: 64,
            require_seqs: 1,
            utilization: DEFAULT_UTILIZATION,
            fixed_overhead: if cpu { CPU_FIXED_OVERHEAD } else { GPU_FIXED_OVERHEAD },
        }
    }
}

/// The latent cache: `kv_lora_rank + qk_rope_head_dim` values per token per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPlan {
    /// num_hidden_layers, + the MTP layer when loaded (it gets its own layer in the same pages).
    pub layers: usize,
    pub row_dim: usize,
    pub elem_bytes: usize,
    pub bytes_per_token: u64,
    pub page_size: usize,
    pub bytes_per_page: u64,
    pub pages_per_seq: u64,
    pub bytes_per_seq: u64,
}

impl KvPlan {
    pub fn new(cfg: &DeepSeekConfig, opts: &PlanOptions) -> Self {
        let layers = cfg.num_hidden_layers + if opts.mtp { cfg.num_nextn_predict_layers } else { 0 };
        let row_dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
        let bytes_per_token = (layers * row_dim * opts.dtype_bytes) as u64;
        let page_size = opts.page_size.max(1);
        let bytes_per_page = bytes_per_token * page_size as u64;
        let pages_per_seq = opts.context.div_ceil(page_size) as u64;
        KvPlan {
            layers,
            row_dim,
            elem_bytes: opts.dtype_bytes,
            bytes_per_token,
            page_size,
            bytes_per_page,
            pages_per_seq,
            bytes_per_seq: pages_per_seq * bytes_per_page,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserve {
    pub fixed: u64,
    pub activations: u64,
    pub logits: u64,
}

impl Reserve {
    pub fn new(cfg: &DeepSeekConfig, layout: &Layout, opts: &PlanOptions) -> Self {
        let (d, tp, moe_tp) = (cfg.hidden_size as u64, layout.tp as u64, layout.moe_tp() as u64);
        let dense = if cfg.first_k_dense_replace > 0 || cfg.n_routed_experts.is_none() { cfg.intermediate_size } else { 0 };
        let (k, im) = (cfg.num_experts_per_tok as u64, cfg.moe_intermediate_size as u64);
        let ffn = (dense as u64 / tp).max(im * cfg.n_shared_experts as u64 / tp).max(if cfg.n_routed_experts.is_some() {
            k * im / moe_tp
        } else {
            0
        });
        let heads = (cfg.num_attention_heads / layout.tp).max(1) as u64;
        let attn = heads * (2 * cfg.qk_head_dim() + 2 * cfg.v_head_dim) as u64;
        let dispatch = if layout.ep > 1 { 2 * k * d } else { 0 };
        let per_token = ACT_HIDDEN_BUFFERS * d + 2 * ffn + attn + dispatch;
        Reserve {
            fixed: opts.fixed_overhead,
            activations: opts.max_batch_tokens as u64 * opts.dtype_bytes as u64 * per_token,
            logits: LOGIT_BUFFERS * opts.max_seqs as u64 * cfg.vocab_size as u64 * 4,
        }
    }

    pub fn total(&self) -> u64 {
        self.fixed + self.activations + self.logits
    }
}

/// Resident weights of one class in one format: in all, and on the fullest rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassShare {
    pub class: Class,
    pub mtp: bool,
    pub format: Format,
    pub params: u64,
    pub bytes: u64,
    pub bytes_per_rank: u64,
}

#[derive(Debug, Clone)]
pub struct LayoutPlan {
    pub layout: Layout,
    /// Why the layout cannot split this model (heads, FP8 blocks, ...).
    pub invalid: Option<String>,
    pub weights: Vec<ClassShare>,
    pub weight_bytes_per_rank: u64,
    pub reserve: Reserve,
    /// utilization × device memory.
    pub usable: u64,
    /// What is left for the KV cache on each rank (negative: weights and reserve do not fit).
    pub kv_budget_per_rank: i64,
    /// Sequences of `context` tokens one attention replica holds (all its TP ranks hold the same
    /// latent rows).
    pub seqs_per_replica: u64,
    /// Over all attention replicas.
    pub total_seqs: u64,
    pub fits: bool,
    /// The attention TP group spans more than one node.
    pub cross_node_tp: bool,
}

pub fn plan_layout(
    cfg: &DeepSeekConfig,
    inv: &Inventory,
    hw: &Hardware,
    layout: Layout,
    opts: &PlanOptions,
    kv: &KvPlan,
) -> LayoutPlan {
    let mut weights: Vec<ClassShare> = Vec::new();
    let mut invalid = None;
    for e in inv.entries.iter().filter(|e| e.loaded && (opts.mtp || !e.mtp)) {
        let format = e.resident(&opts.spec);
        let per_rank = match layout.shard(e, format, cfg.num_attention_heads) {
            Ok((n, shape)) => n * format.bytes(&shape),
            Err(msg) => {
                invalid.get_or_insert(msg);
                0
            }
        };
        let bytes = e.count() * format.bytes(&e.shape);
        match weights.iter_mut().find(|s| (s.class, s.mtp, s.format) == (e.class, e.mtp, format)) {
            Some(s) => {
                s.params += e.params();
                s.bytes += bytes;
                s.bytes_per_rank += per_rank;
            }
            None => weights.push(ClassShare {
                class: e.class,
                mtp: e.mtp,
                format,
                params: e.params(),
                bytes,
                bytes_per_rank: per_rank,
            }),
        }
    }
    weights.sort_by_key(|s| (s.mtp, s.class, s.format));
    let weight_bytes_per_rank = weights.iter().map(|s| s.bytes_per_rank).sum();
    let reserve = Reserve::new(cfg, &layout, opts);
    let usable = (hw.device_bytes as f64 * opts.utilization) as u64;
    let kv_budget_per_rank = usable as i64 - weight_bytes_per_rank as i64 - reserve.total() as i64;
    let seqs_per_replica = if kv_budget_per_rank > 0 { kv_budget_per_rank as u64 / kv.bytes_per_seq } else { 0 };
    // without data-parallel attention every rank serves the same sequences
    let total_seqs = seqs_per_replica;
    let invalid = invalid.or_else(|| layout.unsupported());
    LayoutPlan {
        layout,
        fits: invalid.is_none() && total_seqs >= opts.require_seqs.max(1),
        invalid,
        weights,
        weight_bytes_per_rank,
        reserve,
        usable,
        kv_budget_per_rank,
        seqs_per_replica,
        total_seqs,
        cross_node_tp: layout.tp > hw.per_node,
    }
}

/// Every candidate layout for the hardware (one rank on a CPU host).
pub fn plan_all(cfg: &DeepSeekConfig, inv: &Inventory, hw: &Hardware, opts: &PlanOptions) -> Vec<LayoutPlan> {
    let kv = KvPlan::new(cfg, opts);
    Layout::candidates(hw.devices).into_iter().map(|l| plan_layout(cfg, inv, hw, l, opts, &kv)).collect()
}

/// The fitting layout holding the most sequences; ties go to TP within a node, then wider TP.
pub fn best(plans: &[LayoutPlan]) -> Option<&LayoutPlan> {
    plans.iter().filter(|p| p.fits).max_by_key(|p| (p.total_seqs, !p.cross_node_tp, p.layout.tp, p.layout.ep))
}
