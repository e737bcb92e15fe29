//! `moeserve plan` numbers for DeepSeek-R1-0528 (FP8) against a hand calculation written out
//! here from the config's dimensions (deepseek-v3-spec §1–2), independent of how the plan
//! module builds its tensor list.

use moeserve_plan::memory::{plan_layout, KvPlan, PlanOptions};
use moeserve_plan::{presets, Hardware, Inventory, Layout};

// config.json of deepseek-ai/DeepSeek-R1-0528
const D: u64 = 7168; // hidden_size
const V: u64 = 129280; // vocab_size
const L: u64 = 61; // num_hidden_layers
const DENSE: u64 = 3; // first_k_dense_replace
const MOE: u64 = L - DENSE;
const H: u64 = 128; // num_attention_heads
const QL: u64 = 1536; // q_lora_rank
const KVL: u64 = 512; // kv_lora_rank
const NOPE: u64 = 128;
const ROPE: u64 = 64;
const VH: u64 = 128; // v_head_dim
const I: u64 = 18432; // intermediate_size
const IM: u64 = 2048; // moe_intermediate_size
const E: u64 = 256; // n_routed_experts
const K: u64 = 8; // num_experts_per_tok

/// FP8 e4m3 [r, c]: one byte per weight + an f32 scale per 128×128 block (ceil on both dims).
fn fp8(r: u64, c: u64) -> u64 {
    r * c + r.div_ceil(128) * c.div_ceil(128) * 4
}

fn scales(r: u64, c: u64) -> u64 {
    r.div_ceil(128) * c.div_ceil(128)
}

// --- parameters ---
// attention: q_a [1536,7168] + q_a_norm [1536] + q_b [128·192, 1536] + kv_a [576,7168]
//            + kv_a_norm [512] + kv_b [128·256, 512] + o [7168, 128·128]
const ATTN_P: u64 = QL * D + QL + H * (NOPE + ROPE) * QL + (KVL + ROPE) * D + KVL + H * (NOPE + VH) * KVL + D * H * VH;
const LAYER_NORMS_P: u64 = 2 * D;
const DENSE_P: u64 = 3 * I * D;
const EXPERT_P: u64 = 3 * IM * D; // one routed expert (gate, up, down); the shared expert is the same size
const ROUTER_P: u64 = E * D + E; // gate weight + e_score_correction_bias
const MAIN_P: u64 =
    V * D + L * (ATTN_P + LAYER_NORMS_P) + DENSE * DENSE_P + MOE * (E * EXPERT_P + EXPERT_P + ROUTER_P) + D + V * D;
// MTP layer 61: a MoE block + embed_tokens copy + enorm + hnorm + eh_proj [7168, 14336] + shared_head (norm, head)
const MTP_P: u64 = ATTN_P + LAYER_NORMS_P + E * EXPERT_P + EXPERT_P + ROUTER_P + V * D + 3 * D + D * 2 * D + V * D;

fn r1() -> (moeserve_core::DeepSeekConfig, Inventory) {
    let cfg = presets::find("deepseek-r1-0528").unwrap().config().unwrap();
    let inv = Inventory::from_config(&cfg);
    (cfg, inv)
}

#[test]
fn parameters_and_checkpoint_size() {
    let (_, inv) = r1();
    assert_eq!(MAIN_P, 671_026_419_200); // "671B"
    assert_eq!(MTP_P, 13_463_426_304); // "14B" of MTP
    assert_eq!(inv.params(Some(false)), MAIN_P);
    assert_eq!(inv.params(Some(true)), MTP_P);
    assert_eq!(inv.params(None), 684_489_845_504); // "685B" on the model card

    // a public tensor-by-tensor report of the R1 FP8 checkpoint counts 91,991 tensors and
    // 684,531,386,000 elements (weights + scale_inv), 641.29 GiB
    let attn_s = scales(QL, D) + scales(H * 192, QL) + scales(576, D) + scales(H * 256, KVL) + scales(D, H * VH);
    let expert_s = 2 * scales(IM, D) + scales(D, IM);
    let all_s = (L + 1) * attn_s + DENSE * (2 * scales(I, D) + scales(D, I)) + (MOE + 1) * (E + 1) * expert_s;
    assert_eq!(MAIN_P + MTP_P + all_s, 684_531_386_000);
    let per_layer_tensors = 14; // 7 attention tensors + 5 scales + 2 layer norms
    let moe_tensors = per_layer_tensors + 2 + (E + 1) * 6;
    assert_eq!(inv.tensor_files(), DENSE * (per_layer_tensors + 6) + (MOE + 1) * moe_tensors + 3 + 6);
    assert_eq!(inv.tensor_files(), 91_991);

    let attn_b = fp8(QL, D) + 2 * QL + fp8(H * 192, QL) + fp8(576, D) + 2 * KVL + fp8(H * 256, KVL) + fp8(D, H * VH);
    let expert_b = 2 * fp8(IM, D) + fp8(D, IM);
    let router_b = 2 * E * D + 4 * E; // bf16 weight, f32 bias
    let main_b = 2 * V * D * 2
        + 2 * D
        + L * (attn_b + 4 * D)
        + DENSE * (2 * fp8(I, D) + fp8(D, I))
        + MOE * (E * expert_b + expert_b + router_b);
    let mtp_b = attn_b + 4 * D + E * expert_b + expert_b + router_b + 2 * V * D * 2 + 3 * 2 * D + 2 * D * 2 * D;
    assert_eq!(inv.source_bytes(), main_b + mtp_b);
    assert_eq!(inv.source_bytes(), 688_574_839_360);
    let gib = inv.source_bytes() as f64 / (1u64 << 30) as f64;
    assert!((641.28..641.30).contains(&gib), "{gib}");
    assert!((642e9..690e9).contains(&(inv.source_bytes() as f64)));
}

/// Per-rank weight bytes on `world` ranks, TP=world, EP=ep over the same ranks, no MTP.
fn hand_weights_per_rank(world: u64, ep: u64) -> u64 {
    let t = world;
    let moe_tp = world / ep;
    let attn = fp8(QL, D) + 2 * QL + fp8(H * 192 / t, QL) + fp8(576, D) + 2 * KVL + fp8(H * 256 / t, KVL) + fp8(D, H * VH / t);
    let dense = 2 * fp8(I / t, D) + fp8(D, I / t);
    let shared = 2 * fp8(IM / t, D) + fp8(D, IM / t);
    let experts = E.div_ceil(ep) * (2 * fp8(IM / moe_tp, D) + fp8(D, IM / moe_tp));
    let router = E * D * 4 + E * 4; // the loader keeps the router weight in f32
                                    // the embedding is replicated, lm_head vocab-parallel
    let vocab_rows = V.div_ceil(t);
    V * D * 2 + vocab_rows * D * 2 + L * (attn + 4 * D) + 2 * D + DENSE * dense + MOE * (shared + experts + router)
}

/// Sequences of 131072 tokens: (usable − weights − reserve) / KV bytes per sequence.
fn hand_seqs(device_mib: u64, world: u64, ep: u64, weights: u64) -> u64 {
    let usable = ((device_mib << 20) as f64 * 0.90) as u64;
    let t = world;
    let moe_tp = world / ep;
    // reserve: 2 GiB + 512 tokens × 2 B × (8·D + 2·max(I/t, IM/t, K·IM/moe_tp) + (H/t)·(2·192 + 2·128) + 2·K·D)
    let ffn = (I / t).max(IM / t).max(K * IM / moe_tp);
    let dispatch = if ep > 1 { 2 * K * D } else { 0 };
    let act = 512 * 2 * (8 * D + 2 * ffn + (H / t) * (2 * 192 + 2 * 128) + dispatch);
    let logits = 2 * 64 * V * 4;
    let reserve = (2 << 30) + act + logits;
    // KV: 61 layers × (512 + 64) values × 2 B (bf16) per token, pages of 16
    let per_token = L * (KVL + ROPE) * 2;
    assert_eq!(per_token, 70_272);
    let per_seq = 131072u64.div_ceil(16) * 16 * per_token;
    (usable - weights - reserve) / per_seq
}

fn check(gpus: &str, device_mib: u64, world: u64, ep: u64) -> (u64, u64) {
    let (cfg, inv) = r1();
    let hw = Hardware::parse(gpus, None).unwrap();
    let opts = PlanOptions::for_hardware(&hw);
    let kv = KvPlan::new(&cfg, &opts);
    assert_eq!((kv.bytes_per_token, kv.bytes_per_page), (70_272, 70_272 * 16));
    let p = plan_layout(&cfg, &inv, &hw, Layout::new(world as usize, ep as usize, world as usize).unwrap(), &opts, &kv);
    assert!(p.invalid.is_none(), "{:?}", p.invalid);
    let w = hand_weights_per_rank(world, ep);
    assert_eq!(p.weight_bytes_per_rank, w, "{gpus} TP={world} EP={ep}");
    let seqs = hand_seqs(device_mib, world, ep, w);
    assert_eq!(p.total_seqs, seqs, "{gpus} TP={world} EP={ep}");
    assert!(p.fits);
    (w, seqs)
}

#[test]
fn r1_fp8_on_8x_h200() {
    // TP=8 with EP=8 over the same ranks: 32 whole experts per rank
    let (w, seqs) = check("8xH200", 143771, 8, 8);
    assert!((86.9e9..87.0e9).contains(&(w as f64)), "{w}");
    assert_eq!(seqs, 5);
    // TP=8, EP=1: every expert split 8 ways by columns/rows
    let (w1, seqs1) = check("8xH200", 143771, 8, 1);
    // the same bytes: 128-row scale blocks line up with both splits
    assert_eq!(w1, w);
    assert_eq!(seqs1, 5);
}

#[test]
fn r1_fp8_on_16x_h100() {
    let (w, seqs) = check("16xH100", 81559, 16, 16);
    assert!((45.0e9..45.1e9).contains(&(w as f64)), "{w}");
    assert_eq!(seqs, 3);
    check("16xH100", 81559, 16, 1);
}

#[test]
fn expert_parallel_alone_replicates_attention() {
    let (cfg, inv) = r1();
    let hw = Hardware::parse("8xH200", None).unwrap();
    let opts = PlanOptions::for_hardware(&hw);
    let kv = KvPlan::new(&cfg, &opts);
    // TP=1, EP=8: attention, embeddings and lm_head replicated on every rank, 32 experts each
    let p = plan_layout(&cfg, &inv, &hw, Layout::new(1, 8, 8).unwrap(), &opts, &kv);
    let full_attn = L * (fp8(QL, D) + 2 * QL + fp8(H * 192, QL) + fp8(576, D) + 2 * KVL + fp8(H * 256, KVL) + fp8(D, H * VH));
    let w = 2 * V * D * 2
        + full_attn
        + L * 4 * D
        + 2 * D
        + DENSE * (2 * fp8(I, D) + fp8(D, I))
        + MOE * ((E / 8 + 1) * (2 * fp8(IM, D) + fp8(D, IM)) + E * D * 4 + E * 4);
    assert_eq!(p.weight_bytes_per_rank, w);
    // every rank serves the same sequences: no data-parallel attention
    assert_eq!(p.total_seqs, p.seqs_per_replica);
    assert!(p.invalid.is_none() && p.fits);
    // TP=4 on 8 devices would need data-parallel attention
    let p = plan_layout(&cfg, &inv, &hw, Layout::new(4, 2, 8).unwrap(), &opts, &kv);
    assert!(p.invalid.as_deref().unwrap_or("").contains("data-parallel attention"), "{:?}", p.invalid);
}
