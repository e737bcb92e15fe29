//! Which resident format each class of weights gets: `--quant q4k`, or per class
//! `--quant experts=q4k,attn=q8_0,shared=q8_0` (classes not named keep the checkpoint's format;
//! embeddings, norms and the router always stay in high precision).

use moeserve_core::{Error, Result};
use moeserve_cpu::Format;

/// The weight classes `--quant` can address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorClass {
    /// `self_attn.*` projections.
    Attn,
    /// Routed experts.
    Experts,
    /// Shared experts.
    Shared,
    /// The MLP of dense layers.
    Dense,
    /// `lm_head` and the MTP head.
    LmHead,
    /// Anything else behind the Linear seam (the MTP `eh_proj`).
    Other,
}

impl TensorClass {
    pub const ALL: [TensorClass; 6] = [
        TensorClass::Attn,
        TensorClass::Experts,
        TensorClass::Shared,
        TensorClass::Dense,
        TensorClass::LmHead,
        TensorClass::Other,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            TensorClass::Attn => "attn",
            TensorClass::Experts => "experts",
            TensorClass::Shared => "shared",
            TensorClass::Dense => "dense",
            TensorClass::LmHead => "lm_head",
            TensorClass::Other => "other",
        }
    }

    /// The class of a checkpoint tensor name (`model.layers.3.mlp.experts.7.up_proj`).
    pub fn of(name: &str) -> Self {
        if name.starts_with("lm_head") || name.contains("shared_head.head") {
            TensorClass::LmHead
        } else if name.contains(".mlp.experts.") {
            TensorClass::Experts
        } else if name.contains(".mlp.shared_experts.") {
            TensorClass::Shared
        } else if name.contains(".self_attn.") {
            TensorClass::Attn
        } else if name.contains(".mlp.") {
            TensorClass::Dense
        } else {
            TensorClass::Other
        }
    }
}

/// A requested resident format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    F32,
    Bf16,
    Q8_0,
    Q4K,
    Q6K,
}

impl Target {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Target::F32,
            "bf16" => Target::Bf16,
            "q8_0" | "q8" => Target::Q8_0,
            "q4k" | "q4_k" => Target::Q4K,
            "q6k" | "q6_k" => Target::Q6K,
            other => {
                return Err(Error::Input(format!("unknown weight format `{other}` (f32, bf16, q8_0, q4k, q6k)")));
            }
        })
    }

    pub fn format(&self) -> Format {
        match self {
            Target::F32 => Format::F32,
            Target::Bf16 => Format::Bf16,
            Target::Q8_0 => Format::Q8_0,
            Target::Q4K => Format::Q4K,
            Target::Q6K => Format::Q6K,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuantSpec {
    /// Per class; `None` keeps the checkpoint's format (bf16 stays bf16, FP8 stays FP8).
    pub targets: Vec<(TensorClass, Target)>,
    /// Use plain candle tensors in the compute dtype (the reference path; also every non-CPU
    /// device until the CUDA kernels land).
    pub dense_reference: bool,
}

impl QuantSpec {
    /// `q4k` (every class) or `experts=q4k,attn=q8_0,...`; `default=` names the rest.
    pub fn parse(s: &str) -> Result<Self> {
        let mut spec = QuantSpec::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => {
                    let t = Target::parse(part)?;
                    spec.targets = TensorClass::ALL.iter().map(|&c| (c, t)).collect();
                }
                Some((class, fmt)) => {
                    let t = Target::parse(fmt)?;
                    let classes: Vec<TensorClass> = if class == "default" {
                        TensorClass::ALL.iter().copied().filter(|c| !spec.targets.iter().any(|(k, _)| k == c)).collect()
                    } else {
                        let c = TensorClass::ALL.iter().copied().find(|c| c.name() == class).ok_or_else(|| {
                            Error::Input(format!(
                                "--quant: unknown weight class `{class}` (attn, experts, shared, dense, lm_head, other, default)"
                            ))
                        })?;
                        vec![c]
                    };
                    for c in classes {
                        spec.targets.retain(|(k, _)| *k != c);
                        spec.targets.push((c, t));
                    }
                }
            }
        }
        Ok(spec)
    }

    pub fn target(&self, class: TensorClass) -> Option<Target> {
        self.targets.iter().find(|(c, _)| *c == class).map(|(_, t)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_global_and_per_class_specs() {
        let s = QuantSpec::parse("q4k").unwrap();
        assert!(TensorClass::ALL.iter().all(|&c| s.target(c) == Some(Target::Q4K)));
        let s = QuantSpec::parse("experts=q4k,attn=q8_0,default=q6k").unwrap();
        assert_eq!(s.target(TensorClass::Experts), Some(Target::Q4K));
        assert_eq!(s.target(TensorClass::Attn), Some(Target::Q8_0));
        assert_eq!(s.target(TensorClass::LmHead), Some(Target::Q6K));
        let s = QuantSpec::parse("experts=q4k").unwrap();
        assert_eq!(s.target(TensorClass::Attn), None);
        assert!(QuantSpec::parse("q3k").unwrap_err().to_string().contains("q3k"));
        assert!(QuantSpec::parse("expert=q4k").unwrap_err().to_string().contains("expert"));
    }

    #[test]
    fn classifies_checkpoint_names() {
        assert_eq!(TensorClass::of("model.layers.3.mlp.experts.7.up_proj"), TensorClass::Experts);
        assert_eq!(TensorClass::of("model.layers.3.mlp.shared_experts.up_proj"), TensorClass::Shared);
        assert_eq!(TensorClass::of("model.layers.0.mlp.up_proj"), TensorClass::Dense);
        assert_eq!(TensorClass::of("model.layers.0.self_attn.q_a_proj"), TensorClass::Attn);
        assert_eq!(TensorClass::of("lm_head"), TensorClass::LmHead);
        assert_eq!(TensorClass::of("model.layers.61.shared_head.head"), TensorClass::LmHead);
        assert_eq!(TensorClass::of("model.layers.61.eh_proj"), TensorClass::Other);
    }
}
