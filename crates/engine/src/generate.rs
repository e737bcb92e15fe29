//! The single-sequence generation loop: prefill the prompt, then decode one token at a time
//! through the latent cache (weight-absorbed attention), sampling from the last row's logits.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use moeserve_core::{error::Context, Error, Result};
use moeserve_model::{DeepSeekModel, ForwardBatch, LatentKv};

use crate::request::FinishReason;
use crate::sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (usually EOS); empty: never.
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    /// Prompt forward plus the first sample.
    pub prefill: Duration,
    /// All later steps.
    pub decode: Duration,
    pub finish: FinishReason,
}

/// f32 logits of the last row of `hidden: [n, hidden]` (lm_head runs on that row only).
fn last_logits(model: &DeepSeekModel, hidden: &Tensor) -> Result<Vec<f32>> {
    let n = hidden.dims()[0];
    let last = hidden.narrow(0, n - 1, 1).ctx(|| "last row".into())?;
    model.logits(&last)?.squeeze(0).ctx(|| "logits row".into())?.to_vec1().ctx(|| "logits".into())
}

/// Generate up to `max_tokens` tokens; `on_token` sees each one as soon as it is sampled.
pub fn generate(
    model: &DeepSeekModel,
    req: &GenerateRequest,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerateStats> {
    if req.prompt.is_empty() {
        return Err(Error::Input("empty prompt".into()));
    }
    req.sampling.validate().map_err(Error::Input)?;
    let limit = model.cfg.max_position_embeddings;
    if req.prompt.len() + req.max_tokens > limit {
        return Err(Error::Input(format!(
            "prompt ({}) + max_tokens ({}) exceeds the model's {limit} positions",
            req.prompt.len(),
            req.max_tokens
        )));
    }
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut cache = model.new_cache();
    let mut stats = GenerateStats {
        prompt_tokens: req.prompt.len(),
        generated: 0,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
        finish: FinishReason::Length,
    };
    let t0 = Instant::now();
    let mut batch = ForwardBatch::single(&req.prompt, 0);
    while stats.generated < req.max_tokens {
        let step = Instant::now();
        let hidden = model.forward(&batch, &mut [&mut cache])?;
        let next = sampler.sample(&last_logits(model, &hidden)?);
        if stats.generated == 0 {
            stats.prefill = t0.elapsed();
        } else {
            stats.decode += step.elapsed();
        }
        stats.generated += 1;
        on_token(next)?;
        if req.stop_tokens.contains(&next) {
            stats.finish = FinishReason::Stop;
            break;
        }
        batch = ForwardBatch::single(&[next], cache.seq_len());
    }
    Ok(stats)
}
