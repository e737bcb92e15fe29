//! Token sampling: logit bias, repetition / presence / frequency penalties, temperature, top-k,
//! top-p, min-p; a per-sequence seeded generator, so a seeded request samples the same tokens
//! whatever else shares its batch. Log-probabilities are reported from the raw model logits.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k limit.
    pub top_k: usize,
    /// Drop tokens with probability below `min_p × p_max` (0 = off).
    pub min_p: f32,
    /// HF-style: logits of tokens seen in prompt or output are divided (if > 0) or multiplied by it.
    pub repetition_penalty: f32,
    /// OpenAI-style, over generated tokens: `- presence · [count > 0] - frequency · count`.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// DeepSeek-R1's recommended settings.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.6,
            top_p: 0.95,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, ..Default::default() }
    }

    /// Defaults from a model directory's `generation_config.json` (R1: temperature 0.6, top_p
    /// 0.95); R1's recommendation when the file is absent; greedy when it says `do_sample: false`.
    pub fn from_generation_config(dir: &std::path::Path) -> Self {
        let v: serde_json::Value = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let d = SamplingParams::default();
        if v.get("do_sample").and_then(|x| x.as_bool()) == Some(false) {
            return SamplingParams::greedy();
        }
        let f = |k: &str, default: f32| v.get(k).and_then(|x| x.as_f64()).map_or(default, |x| x as f32);
        SamplingParams {
            temperature: f("temperature", d.temperature),
            top_p: f("top_p", d.top_p),
            top_k: v.get("top_k").and_then(|x| x.as_u64()).map_or(0, |x| x as usize),
            repetition_penalty: f("repetition_penalty", 1.0),
            ..d
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.logit_bias.iter().any(|(_, b)| !b.is_finite()) {
            return Err("logit_bias values must be finite".into());
        }
        Ok(())
    }

    pub fn uses_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// The sampled token's log-probability and the most likely alternatives (raw model distribution).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Sampler { params, rng }
    }

    /// Pick the next token from one row of float32 logits (no history: no penalties apply).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_with_history(logits, &[], &[])
    }

    /// Pick the next token; `prompt` and `output` feed the penalties.
    pub fn sample_with_history(&mut self, logits: &[f32], prompt: &[u32], output: &[u32]) -> u32 {
        let dist = self.distribution(logits, prompt, output);
        self.draw(&dist)
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// A uniform draw in [0, 1) from this sequence's generator.
    pub fn uniform(&mut self) -> f32 {
        self.rng.gen::<f32>()
    }

    /// The processed distribution the sampler draws from: logit bias, penalties over
    /// `prompt` + `output`, temperature, top-k, min-p, top-p (speculative decoding verifies
    /// drafts against exactly this distribution).
    pub fn distribution(&self, logits: &[f32], prompt: &[u32], output: &[u32]) -> Dist {
        let p = &self.params;
        let greedy = p.temperature <= 0.0 || p.top_k == 1;
        if greedy && p.logit_bias.is_empty() && !p.uses_penalties() {
            return Dist::Point(argmax(logits));
        }
        let mut l = logits.to_vec();
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += b;
            }
        }
        if p.uses_penalties() {
            apply_penalties(&mut l, p, prompt, output);
        }
        if greedy {
            return Dist::Point(argmax(&l));
        }
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let weights = moeserve_cpu::exp_shifted(&l, m, 1.0 / p.temperature);
        let mut cand: Vec<(u32, f32)> = Vec::with_capacity(l.len());
        cand.extend(l.iter().zip(weights).enumerate().filter(|(_, (x, _))| x.is_finite()).map(|(i, (_, w))| (i as u32, w)));
        if cand.is_empty() {
            return Dist::Point(argmax(logits));
        }
        // the largest candidates, sorted, as many as the filters can keep; top-p alone measures
        // its share against every candidate's weight
        let total: f32 = cand.iter().map(|c| c.1).sum();
        sort_kept_prefix(&mut cand, p, total);
        apply_filters(&mut cand, p, total);
        Dist::Weights(cand)
    }

    /// Draw one token from `dist` (a point mass consumes no randomness).
    pub fn draw(&mut self, dist: &Dist) -> u32 {
        match dist {
            Dist::Point(t) => *t,
            Dist::Weights(cand) => {
                let mass: f32 = cand.iter().map(|c| c.1).sum();
                let mut u = self.rng.gen::<f32>() * mass;
                for &(id, w) in cand {
                    if u < w {
                        return id;
                    }
                    u -= w;
                }
                cand[cand.len() - 1].0
            }
        }
    }
}

/// A processed next-token distribution: a point mass (greedy) or unnormalized weights of the
/// surviving candidates, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    Point(u32),
    Weights(Vec<(u32, f32)>),
}

impl Dist {
    /// Normalized probability of `token`.
    pub fn prob(&self, token: u32) -> f32 {
        match self {
            Dist::Point(t) => f32::from(*t == token),
            Dist::Weights(c) => {
                let mass: f32 = c.iter().map(|x| x.1).sum();
                c.iter().find(|x| x.0 == token).map_or(0.0, |x| x.1 / mass.max(f32::MIN_POSITIVE))
            }
        }
    }

    /// Normalized `(token, probability)` pairs.
    pub fn probs(&self) -> Vec<(u32, f32)> {
        match self {
            Dist::Point(t) => vec![(*t, 1.0)],
            Dist::Weights(c) => {
                let mass: f32 = c.iter().map(|x| x.1).sum::<f32>().max(f32::MIN_POSITIVE);
                c.iter().map(|&(t, w)| (t, w / mass)).collect()
            }
        }
    }
}

fn apply_penalties(l: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    if p.repetition_penalty != 1.0 {
        let mut seen: Vec<u32> = prompt.iter().chain(output).copied().collect();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            if let Some(x) = l.get_mut(t as usize) {
                *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(x) = l.get_mut(t as usize) {
                *x -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
}

/// Log-probability of `token` under softmax(logits), and the `top` most likely tokens.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let pos = best.partition_point(|b| b.1 >= x);
                best.insert(pos, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |x| x - lse),
        top: best.into_iter().map(|(i, x)| (i, x - lse)).collect(),
    }
}

/// The first position of the largest value (NaNs ignored; 0 when there is none). The maximum is
/// taken in 16 independent lanes, so both passes vectorize: a vocabulary of 129k logits costs
/// microseconds, not the tenth of a millisecond of one compare chain.
pub fn argmax(v: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let max = tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let chunk = v.chunks(16).position(|c| c.iter().fold(false, |hit, &x| hit | (x == max))).unwrap_or(0);
    (chunk * 16 + v[chunk * 16..].iter().position(|&x| x == max).unwrap_or(0)) as u32
}

/// Top-k, min-p and top-p in turn on candidates sorted by descending weight; `total` is the
/// weight of every candidate, which top-p alone measures its share against.
fn apply_filters(cand: &mut Vec<(u32, f32)>, p: &SamplingParams, total: f32) {
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    if p.min_p > 0.0 {
        let floor = cand[0].1 * p.min_p;
        cand.retain(|c| c.1 >= floor);
    }
    if p.top_p < 1.0 {
        // the smallest prefix whose mass reaches top_p (always at least one token)
        let total = if p.top_k > 0 || p.min_p > 0.0 { cand.iter().map(|c| c.1).sum() } else { total };
        let mut acc = 0.0;
        let cut = cand.iter().position(|c| {
            acc += c.1 / total;
            acc >= p.top_p
        });
        cand.truncate(cut.map_or(cand.len(), |i| i + 1));
    }
}

/// Sort the largest candidates by descending weight and drop the others, keeping every token
/// that `p`'s top-k, min-p and top-p can keep (`total`: the weight of all of them). Sorting a
/// whole vocabulary costs milliseconds per token, and the kept tokens are the largest few, so the
/// largest `n` are selected (n = 64, 256, ..) until they provably hold every kept token, and only
/// they are sorted. With no filter every token stays, in any order (the distribution does not
/// depend on it).
fn sort_kept_prefix(cand: &mut Vec<(u32, f32)>, p: &SamplingParams, total: f32) {
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal);
    let len = cand.len();
    let limit = if p.top_k > 0 { p.top_k.min(len) } else { len };
    if limit == len && p.min_p <= 0.0 && p.top_p >= 1.0 {
        return;
    }
    let mut n = limit.min(64);
    loop {
        if n < len {
            cand.select_nth_unstable_by(n - 1, desc);
        }
        cand[..n].sort_unstable_by(desc);
        // enough: top-k's bound; or the prefix ends below min-p's floor (every token min-p keeps
        // is in it, and top-p then works within them); or, top-p alone, the prefix's mass is
        // past top-p's share of all (with a margin for the f32 sums' order)
        let below_floor = p.min_p > 0.0 && cand[n - 1].1 < cand[0].1 * p.min_p;
        let mass: f32 = cand[..n].iter().map(|c| c.1).sum();
        let past_top_p = p.top_k == 0 && p.min_p <= 0.0 && mass >= (p.top_p + 1e-3) * total;
        if n == limit || below_floor || past_top_p {
            cand.truncate(n);
            return;
        }
        n = (n * 4).min(limit);
    }
}

#[cfg(test)]
mod tests;
