//! YaRN rotary embedding on interleaved pairs (2i, 2i+1), as the checkpoints store rope channels.
//!
//! inv_freq blends the original and the `factor`-interpolated frequencies over the correction
//! range derived from `original_max_position_embeddings`; cos/sin are scaled by
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` (1.0 for R1), and the rest of YaRN's
//! magnitude correction lives in the softmax scale (`DeepSeekConfig::softmax_scale`).

use candle_core::{DType, Device, Tensor};
use moeserve_core::config::yarn_get_mscale;
use moeserve_core::{error::Context, DeepSeekConfig, Result};

#[derive(Debug, Clone)]
pub struct Rope {
    /// [rope_dim / 2], float32
    inv_freq: Vec<f32>,
    attention_scaling: f32,
}

/// cos/sin rows for the positions of one batch: `[n_tokens, rope_dim / 2]`, float32.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    /// `(cos, sin)` values when the tables are CPU tensors: f32 CPU inputs take the fused loop.
    cpu: Option<(Vec<f32>, Vec<f32>)>,
}

impl Rope {
    pub fn new(cfg: &DeepSeekConfig) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let half = dim / 2;
        // base^(2i/dim), in f32 like the references
        let pos_freqs: Vec<f32> = (0..half).map(|i| (base as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let Some(y) = &cfg.rope_scaling else {
            return Rope { inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(), attention_scaling: 1.0 };
        };
        let correction_dim = |rotations: f64| {
            dim as f64 * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let low = correction_dim(y.beta_fast).floor().max(0.0);
        let mut high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp; // weight of the original frequency
                let interp = 1.0 / (y.factor as f32 * p);
                let extra = 1.0 / p;
                interp * (1.0 - extrapolation) + extra * extrapolation
            })
            .collect();
        let attention_scaling = (yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)) as f32;
        Rope { inv_freq, attention_scaling }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn tables(&self, positions: &[usize], device: &Device) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        let shape = (positions.len(), half);
        let cpu = device.is_cpu().then(|| (cos.clone(), sin.clone()));
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, shape, device).ctx(|| "rope cos".into())?,
            sin: Tensor::from_vec(sin, shape, device).ctx(|| "rope sin".into())?,
            cpu,
        })
    }
}

impl RopeTables {
    /// Rotate `x: [n_tokens, heads, rope_dim]` (interleaved pairs), in f32, back to x's dtype.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::device_ops::rope(x, &self.cos, &self.sin)? {
            return Ok(y);
        }
        let ctx = || format!("rope {:?}", x.dims());
        // f32 and bf16 CPU inputs: rotated in f32 (as candle's `rope_i` below), a bf16 input's
        // result rounded back
        if let (Some((cos, sin)), true) = (&self.cpu, x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16)) {
            let (n, heads, dim) = x.dims3().ctx(ctx)?;
            let (mut xs, _) = moeserve_quant::packed::rows_f32(x, dim, "rope")?;
            if dim % 2 != 0 || cos.len() != n * dim / 2 {
                return Err(moeserve_core::Error::Input(format!("rope: {n} tokens of {dim}, tables hold {}", cos.len())));
            }
            moeserve_cpu::elementwise::rope_interleaved(&mut xs, cos, sin, heads, dim / 2);
            let y = Tensor::from_vec(xs, (n, heads, dim), x.device()).ctx(ctx)?;
            return y.to_dtype(x.dtype()).ctx(ctx);
        }
        let dtype = x.dtype();
        // rope_i wants [batch, heads, tokens, dim]
        let xt = x.to_dtype(DType::F32).ctx(ctx)?.transpose(0, 1).ctx(ctx)?.unsqueeze(0).ctx(ctx)?.contiguous().ctx(ctx)?;
        let y = candle_nn::rotary_emb::rope_i(&xt, &self.cos, &self.sin).ctx(ctx)?;
        y.squeeze(0).ctx(ctx)?.transpose(0, 1).ctx(ctx)?.to_dtype(dtype).ctx(ctx)?.contiguous().ctx(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r1_inverse_frequencies_match_the_spec_table() {
        let text = include_str!("../../../models/deepseek-r1-0528/config.json");
        let cfg = DeepSeekConfig::from_json_str(text, "r1").unwrap();
        let rope = Rope::new(&cfg);
        let f = rope.inv_freq();
        let expect = [
            (0, 1.0),
            (8, 1.0e-1),
            (10, 5.623413e-2),
            (11, 3.900693e-2),
            (12, 2.687936e-2),
            (16, 5.5e-3),
            (20, 7.905694e-4),
            (22, 1.778279e-4),
            (23, 3.333804e-5),
            (31, 3.333804e-6),
        ];
        for (i, v) in expect {
            assert!(((f[i] as f64 - v) / v).abs() < 1e-5, "inv_freq[{i}] = {} expected {v}", f[i]);
        }
        assert_eq!(rope.attention_scaling, 1.0);
    }

    /// The fused loop gives candle's `rope_i` bits on f32 and on bf16 inputs.
    #[test]
    fn fused_rotation_matches_candles() {
        let cfg = DeepSeekConfig::from_json_str(include_str!("../../../tests/fixtures/tiny-v3/config.json"), "c").unwrap();
        let rope = Rope::new(&cfg);
        let dim = cfg.qk_rope_head_dim;
        let t = rope.tables(&[0, 5, 77, 4000], &Device::Cpu).unwrap();
        let plain = RopeTables { cos: t.cos.clone(), sin: t.sin.clone(), cpu: None };
        let x = Tensor::randn(0f32, 2.0, (4, 3, dim), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dtype).unwrap();
            let get = |t: &RopeTables| -> Vec<f32> {
                let y = t.apply(&x).unwrap();
                assert_eq!(y.dtype(), dtype);
                y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            };
            assert_eq!(get(&t), get(&plain), "{dtype:?}");
        }
    }

    #[test]
    fn rotation_is_on_adjacent_pairs() {
        let cfg = DeepSeekConfig::from_json_str(include_str!("../../../tests/fixtures/tiny-v3/config.json"), "c").unwrap();
        let rope = Rope::new(&cfg);
        let t = rope.tables(&[3], &Device::Cpu).unwrap();
        let x = Tensor::new(&[[[1f32, 0., 0., 1., 2., 0., 0., 0.]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = t.apply(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let a0 = 3.0 * rope.inv_freq()[0];
        let a1 = 3.0 * rope.inv_freq()[1];
        let a2 = 3.0 * rope.inv_freq()[2];
        let expect = [a0.cos(), a0.sin(), -a1.sin(), a1.cos(), 2.0 * a2.cos(), 2.0 * a2.sin(), 0.0, 0.0];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {expect:?}");
        }
    }
}
