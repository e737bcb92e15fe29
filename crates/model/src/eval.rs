//! Quantization quality the way llama.cpp reports it: over fixed token windows, the mean KL
//! divergence of the quantized model's next-token distribution from the reference model's, how
//! often their top-1 tokens agree, and both perplexities.

use candle_core::Tensor;
use moeserve_core::{error::Context, Result};

use crate::batch::ForwardBatch;
use crate::model::DeepSeekModel;

#[derive(Debug, Clone, PartialEq)]
pub struct QuantQuality {
    pub windows: usize,
    /// Positions compared (every position of every window).
    pub positions: usize,
    /// Mean KL(reference || quantized) in nats.
    pub mean_kld: f64,
    pub max_kld: f64,
    /// Fraction of positions whose argmax tokens agree.
    pub top1_agreement: f64,
    /// Perplexity of each model on the windows' next tokens.
    pub ppl_reference: f64,
    pub ppl_quantized: f64,
}

fn window_logits(model: &DeepSeekModel, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut cache = model.new_cache();
    let hidden = model.forward(&ForwardBatch::single(tokens, 0), &mut [&mut cache])?;
    let logits: Tensor = model.logits(&hidden)?;
    logits.to_vec2::<f32>().ctx(|| "eval logits".into())
}

/// Log-softmax in f64.
fn log_probs(l: &[f32]) -> Vec<f64> {
    let max = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = l.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    l.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
}

/// Compare `quantized` against `reference` on each window (the next-token targets are the
/// window's own tokens; the last position of a window has no target for perplexity).
pub fn compare(reference: &DeepSeekModel, quantized: &DeepSeekModel, windows: &[Vec<u32>]) -> Result<QuantQuality> {
    let (mut kld_sum, mut max_kld, mut agree, mut positions) = (0f64, 0f64, 0usize, 0usize);
    let (mut nll_ref, mut nll_q, mut targets) = (0f64, 0f64, 0usize);
    for w in windows {
        let (r, q) = (window_logits(reference, w)?, window_logits(quantized, w)?);
        for (i, (lr, lq)) in r.iter().zip(&q).enumerate() {
            let (pr, pq) = (log_probs(lr), log_probs(lq));
            let kld: f64 = pr.iter().zip(&pq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0);
            kld_sum += kld;
            max_kld = max_kld.max(kld);
            agree += (argmax(&pr) == argmax(&pq)) as usize;
            positions += 1;
            if let Some(&next) = w.get(i + 1) {
                nll_ref -= pr[next as usize];
                nll_q -= pq[next as usize];
                targets += 1;
            }
        }
    }
    let n = positions.max(1) as f64;
    let t = targets.max(1) as f64;
    Ok(QuantQuality {
        windows: windows.len(),
        positions,
        mean_kld: kld_sum / n,
        max_kld,
        top1_agreement: agree as f64 / n,
        ppl_reference: (nll_ref / t).exp(),
        ppl_quantized: (nll_q / t).exp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LoadOptions;
    use moeserve_quant::QuantSpec;

    fn load(quant: &str) -> DeepSeekModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v3");
        let quant = if quant.is_empty() { QuantSpec::default() } else { QuantSpec::parse(quant).unwrap() };
        DeepSeekModel::load(&dir, &LoadOptions { quant, load_mtp: false, ..Default::default() }).unwrap()
    }

    #[test]
    fn quantization_quality_is_ordered_by_bits() {
        let windows: Vec<Vec<u32>> = (0..3).map(|w| (0..48).map(|i| ((i * 37 + w * 101) % 4000 + 2) as u32).collect()).collect();
        let reference = load("");
        let same = compare(&reference, &reference, &windows).unwrap();
        assert!(same.mean_kld < 1e-9 && same.top1_agreement == 1.0 && same.ppl_reference == same.ppl_quantized);
        let q8 = compare(&reference, &load("q8_0"), &windows).unwrap();
        let q4 = compare(&reference, &load("q4k"), &windows).unwrap();
        for q in [&q8, &q4] {
            assert!(q.mean_kld.is_finite() && q.ppl_quantized.is_finite() && q.positions == 144, "{q:?}");
        }
        assert!(q8.mean_kld * 4.0 < q4.mean_kld, "q8_0 {q8:?} vs q4k {q4:?}");
        assert!(q8.top1_agreement >= q4.top1_agreement, "q8_0 {q8:?} vs q4k {q4:?}");
    }
}
