//! Engine metrics: gauges, counters and latency histograms, snapshotted by the handle.

use std::time::Duration;

use crate::spec::SpecStats;

/// Latency histogram with fixed log-spaced buckets (1 ms .. ~65 s).
#[derive(Debug, Clone)]
pub struct Histogram {
    /// upper bounds in seconds
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds: Vec<f64> = (0..17).map(|i| 0.001 * 2f64.powi(i)).collect();
        Histogram { counts: vec![0; bounds.len() + 1], bounds, sum: 0.0, count: 0 }
    }
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    /// Upper bound of the bucket holding quantile `q` (0..1).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let target = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= target {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub waiting: usize,
    pub running: usize,
    pub kv_pages_total: usize,
    pub kv_pages_used: usize,
    pub kv_pages_free: usize,
    pub kv_pages_cached: usize,
    /// Prompt tokens looked up in the prefix cache, and how many were hits.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub requests_finished: u64,
    pub requests_aborted: u64,
    pub requests_rejected: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Seconds spent in forward steps (for tokens/s).
    pub busy_seconds: f64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Draft acceptance over all speculative verification steps.
    pub speculative: SpecStats,
    /// Speculative decoding is on (drafts per step).
    pub num_draft_tokens: usize,
}

impl Metrics {
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_query_tokens == 0 {
            0.0
        } else {
            self.prefix_hit_tokens as f64 / self.prefix_query_tokens as f64
        }
    }

    /// Generated tokens per busy second.
    pub fn generation_tokens_per_second(&self) -> f64 {
        if self.busy_seconds > 0.0 {
            self.generated_tokens as f64 / self.busy_seconds
        } else {
            0.0
        }
    }
}
