//! The single-sequence generation loop: prefill the prompt, then decode one token at a time
//! through the latent cache (weight-absorbed attention), sampling from the last row's logits.
//! With `num_draft_tokens > 0` the MTP head drafts and the main model verifies several tokens
//! per step (`generate_speculative`); the plain loop is its reference.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use moeserve_core::{error::Context, Error, Result};
use moeserve_model::{DeepSeekModel, ForwardBatch, LatentKv, ModelGroup, Mtp};

use crate::request::FinishReason;
use crate::sampling::{Sampler, SamplingParams};
use crate::spec::{verify, DraftPicker, DraftSeq, Drafter, MtpDrafter, SpecStats};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (usually EOS); empty: never.
    pub stop_tokens: Vec<u32>,
    /// Speculative decoding with this many MTP drafts per step (0 = off).
    pub num_draft_tokens: usize,
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
    /// Forward steps after the prefill (one per token without speculation).
    pub decode_steps: usize,
    /// Draft acceptance when decoding speculatively.
    pub speculative: Option<SpecStats>,
}

/// `f` of the f32 logits of the last row of `hidden: [n, hidden]` (lm_head runs on that row
/// only; the logits are read in place, not copied out).
fn with_last_logits<R>(model: &ModelGroup, hidden: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let n = hidden.dims()[0];
    let last = hidden.narrow(0, n - 1, 1).ctx(|| "last row".into())?;
    moeserve_model::with_f32(&model.logits(&last)?, f).ctx(|| "logits".into())
}

/// Generate up to `max_tokens` tokens; `on_token` sees each one as soon as it is sampled.
pub fn generate(model: &ModelGroup, req: &GenerateRequest, mut on_token: impl FnMut(u32) -> Result<()>) -> Result<GenerateStats> {
    check(model.lead(), req)?;
    if req.num_draft_tokens > 0 {
        return generate_speculative(model, &mut MtpDrafter, req, on_token);
    }
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut cache = model.lead().new_cache();
    let mut stats = new_stats(req);
    let mut output = Vec::new();
    let t0 = Instant::now();
    let mut batch = ForwardBatch::single(&req.prompt, 0);
    while stats.generated < req.max_tokens {
        let variant = if stats.generated == 0 { None } else { moeserve_core::ab::begin_step(stats.decode_steps) };
        let step = Instant::now();
        let next = model.step(|| -> Result<u32> {
            let hidden = model.forward(&batch, &mut [&mut cache])?;
            with_last_logits(model, &hidden, |logits| {
                let _p = moeserve_core::profile::span("sampling");
                sampler.sample_with_history(logits, &req.prompt, &output)
            })
        })?;
        if stats.generated == 0 {
            stats.prefill = t0.elapsed();
        } else {
            stats.decode += step.elapsed();
            stats.decode_steps += 1;
            if let Some(b) = variant {
                moeserve_core::ab::end_step(b, step.elapsed());
            }
        }
        stats.generated += 1;
        output.push(next);
        on_token(next)?;
        if req.stop_tokens.contains(&next) {
            stats.finish = FinishReason::Stop;
            break;
        }
        batch = ForwardBatch::single(&[next], cache.seq_len());
    }
    Ok(stats)
}

fn new_stats(req: &GenerateRequest) -> GenerateStats {
    GenerateStats {
        prompt_tokens: req.prompt.len(),
        generated: 0,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
        finish: FinishReason::Length,
        decode_steps: 0,
        speculative: None,
    }
}

/// Speculative decoding of one sequence: after each step `drafter` catches its cache up with the
/// committed tokens and drafts up to `num_draft_tokens`; the main model verifies the pending
/// token and the drafts in one forward and the rejected rows are rolled back.
pub fn generate_speculative(
    model: &ModelGroup,
    drafter: &mut dyn Drafter,
    req: &GenerateRequest,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerateStats> {
    check(model.lead(), req)?;
    if req.max_tokens == 0 {
        return Ok(new_stats(req));
    }
    let prompt = &req.prompt;
    let mut sampler = Sampler::new(req.sampling.clone());
    let (mut cache, mut draft_cache) = (model.lead().new_cache(), Mtp::new_cache(model.lead()));
    let mut stats = new_stats(req);
    let mut spec = SpecStats::default();
    let t0 = Instant::now();
    let mut hidden = model.forward(&ForwardBatch::single(prompt, 0), &mut [&mut cache])?;
    let mut output = vec![with_last_logits(model, &hidden, |l| sampler.sample_with_history(l, prompt, &[]))?];
    // first row of `hidden` (the last forward's chunk start)
    let mut chunk_start = 0;
    stats.prefill = t0.elapsed();
    stats.generated = 1;
    on_token(output[0])?;
    let mut last = output[0];
    while !req.stop_tokens.contains(&last) && stats.generated < req.max_tokens {
        let step = Instant::now();
        let len = cache.seq_len();
        let start = draft_cache.seq_len();
        let k = req.num_draft_tokens.min(req.max_tokens - stats.generated - 1);
        let next_tokens: Vec<u32> =
            (start + 1..len + 1).map(|t| if t < prompt.len() { prompt[t] } else { output[t - prompt.len()] }).collect();
        let (drafts, q) = {
            let picker = DraftPicker::new(&mut sampler, prompt, &output);
            let mut seqs = [DraftSeq { kv: &mut draft_cache, start, next_tokens, hidden_row: start - chunk_start, k, picker }];
            drafter.draft(model, &hidden, &mut seqs)?;
            let [s] = seqs;
            (s.picker.drafts, s.picker.q)
        };
        let (drafts, q) = (&drafts[..drafts.len().min(k)], &q[..q.len().min(k)]);
        let tokens: Vec<u32> = std::iter::once(last).chain(drafts.iter().copied()).collect();
        let rows: Vec<Vec<f32>>;
        (hidden, rows) = model.step(|| -> Result<_> {
            let hidden = model.forward(&ForwardBatch::single(&tokens, len), &mut [&mut cache])?;
            let rows = model.logits(&hidden)?.to_vec2().ctx(|| "logits".into())?;
            Ok((hidden, rows))
        })?;
        chunk_start = len;
        let v = verify(&mut sampler, &rows, drafts, q, prompt, &output);
        cache.set_seq_len(len + 1 + v.accepted)?;
        spec.record(drafts.len(), v.accepted);
        stats.decode_steps += 1;
        for t in v.tokens {
            output.push(t);
            stats.generated += 1;
            last = t;
            on_token(t)?;
            if req.stop_tokens.contains(&t) || stats.generated >= req.max_tokens {
                break;
            }
        }
        stats.decode += step.elapsed();
    }
    if req.stop_tokens.contains(&last) {
        stats.finish = FinishReason::Stop;
    }
    stats.speculative = Some(spec);
    Ok(stats)
}

fn check(model: &DeepSeekModel, req: &GenerateRequest) -> Result<()> {
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
    Ok(())
}
