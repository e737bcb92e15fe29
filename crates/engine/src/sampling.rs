//! Token sampling: greedy, temperature, top-k, top-p; seeded for reproducibility.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k limit.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// DeepSeek-R1's recommended settings.
    fn default() -> Self {
        SamplingParams { temperature: 0.6, top_p: 0.95, top_k: 0, seed: None }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
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

    /// Pick the next token from one row of float32 logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, ((l - m) / t).exp())).collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let total: f32 = cand.iter().map(|c| c.1).sum();
        if self.params.top_p < 1.0 {
            // keep the smallest prefix whose mass reaches top_p (always at least one token)
            let mut acc = 0.0;
            let cut = cand.iter().position(|c| {
                acc += c.1 / total;
                acc >= self.params.top_p
            });
            cand.truncate(cut.map_or(cand.len(), |i| i + 1));
        }
        let mass: f32 = cand.iter().map(|c| c.1).sum();
        let mut u = self.rng.gen::<f32>() * mass;
        for &(id, p) in &cand {
            if u < p {
                return id;
            }
            u -= p;
        }
        cand[cand.len() - 1].0
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_p_excludes_the_tail_and_seeds_reproduce() {
        // probabilities ~ 0.64, 0.24, 0.09, 0.03 at T = 1
        let logits = [3.0, 2.0, 1.0, 0.0];
        let p = SamplingParams { temperature: 1.0, top_p: 0.8, top_k: 0, seed: Some(7) };
        let mut s = Sampler::new(p.clone());
        let draws: Vec<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&d| d < 2), "top-p 0.8 keeps only the first two tokens");
        let ones = draws.iter().filter(|&&d| d == 1).count() as f32 / 2000.0;
        assert!((ones - 0.27).abs() < 0.04, "renormalized share of token 1 was {ones}");
        let mut again = Sampler::new(p);
        assert_eq!((0..2000).map(|_| again.sample(&logits)).collect::<Vec<_>>(), draws);
    }

    #[test]
    fn top_k_and_temperature() {
        let logits = [1.0, 0.9, 0.8, -10.0];
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_p: 1.0, top_k: 2, seed: Some(1) });
        let draws: Vec<u32> = (0..500).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&d| d < 2));
        assert!(draws.contains(&0) && draws.contains(&1));
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
    }
}
