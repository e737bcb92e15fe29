//! Exact bytes from a checkpoint's safetensors headers (no tensor data is read), by class.

use std::collections::BTreeMap;
use std::path::Path;

use moeserve_core::DeepSeekConfig;
use moeserve_quant::Checkpoint;

use crate::inventory::Class;
use crate::Result;

#[derive(Debug, Clone, Default)]
pub struct HeaderTotals {
    pub tensors: u64,
    pub bytes: u64,
    /// (class, in the MTP layer) -> bytes, FP8 scale tensors counted with their weight.
    pub by_class: BTreeMap<(Class, bool), u64>,
    /// Tensors no class matched.
    pub unclassified: Vec<String>,
}

/// The class of a checkpoint tensor name, and whether it is in an MTP layer.
pub fn classify(name: &str, cfg: &DeepSeekConfig) -> Option<(Class, bool)> {
    let (mtp, leaf) = match name.strip_prefix("model.layers.") {
        Some(rest) => {
            let (idx, leaf) = rest.split_once('.')?;
            (idx.parse::<usize>().ok()? >= cfg.num_hidden_layers, leaf)
        }
        None => (false, name),
    };
    let class = if leaf.contains("embed_tokens") {
        Class::Embed
    } else if leaf.starts_with("lm_head") || leaf.starts_with("shared_head.head") {
        Class::LmHead
    } else if leaf.starts_with("mlp.experts.") {
        Class::Experts
    } else if leaf.starts_with("mlp.shared_experts.") {
        Class::Shared
    } else if leaf.starts_with("mlp.gate.") {
        Class::Router
    } else if leaf.starts_with("mlp.") {
        Class::Dense
    } else if leaf.starts_with("self_attn.") {
        Class::Attn
    } else if leaf.starts_with("eh_proj") {
        Class::EhProj
    } else if leaf.contains("norm") {
        Class::Norms
    } else {
        return None;
    };
    Some((class, mtp))
}

/// Open `dir`'s safetensors (index + shards, or one file) and sum the tensors' byte ranges.
pub fn read(dir: &Path, cfg: &DeepSeekConfig) -> Result<HeaderTotals> {
    let ckpt = Checkpoint::open(dir)?;
    let mut t = HeaderTotals::default();
    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort_unstable();
    for name in names {
        let bytes = ckpt.meta(name)?.bytes.len() as u64;
        t.tensors += 1;
        t.bytes += bytes;
        match classify(name, cfg) {
            Some(key) => *t.by_class.entry(key).or_default() += bytes,
            None => t.unclassified.push(name.to_string()),
        }
    }
    Ok(t)
}
