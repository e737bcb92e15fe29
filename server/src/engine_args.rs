//! Engine flags shared by the commands that run the batching engine.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use moeserve_engine::EngineConfig;

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Latent KV cache budget: bytes with an optional unit (512MiB, 4GB, 2GiB) or a fraction of
    /// the currently available memory (0.3).
    #[arg(long, default_value = "0.25")]
    pub kv_cache_memory: String,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Tokens computed per engine step (chunked prefill shares it with decode).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Waiting requests beyond this are rejected as overloaded.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    #[arg(long)]
    pub no_prefix_cache: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum SpecMethod {
    /// Draft with the checkpoint's MTP (next-n) layer.
    Mtp,
}

/// Speculative decoding flags (generate, serve, bench).
#[derive(Args, Debug, Clone)]
pub struct SpecArgs {
    /// Speculative decoding: the draft head proposes tokens that the model verifies in one
    /// forward (lossless: greedy output is unchanged, sampling keeps its distribution).
    #[arg(long, value_enum)]
    pub speculative: Option<SpecMethod>,
    /// Tokens drafted per step (K > 1 runs the single MTP layer recursively).
    #[arg(long, default_value_t = 1, requires = "speculative", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub num_draft_tokens: u16,
}

impl SpecArgs {
    /// Drafts per step, 0 without `--speculative`.
    pub fn draft_tokens(&self) -> usize {
        if self.speculative.is_some() {
            self.num_draft_tokens as usize
        } else {
            0
        }
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo for a fractional --kv-cache-memory")?;
    let kb = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .context("MemAvailable missing in /proc/meminfo")?;
    Ok(kb * 1024)
}

/// `0.3` (fraction of available memory), `512MiB`, `4GB`, `1073741824`.
pub fn parse_memory(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().with_context(|| format!("invalid memory size `{s}`"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("memory size must be > 0: `{s}`");
    }
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" if v <= 1.0 => return Ok((available_memory()? as f64 * v) as usize),
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown memory unit `{other}` in `{s}` (B, KB, KiB, MB, MiB, GB, GiB)"),
    };
    Ok((v * mult) as usize)
}

impl EngineArgs {
    pub fn config(&self) -> Result<EngineConfig> {
        Ok(EngineConfig {
            page_size: self.page_size.max(1),
            kv_cache_bytes: parse_memory(&self.kv_cache_memory)?,
            max_batch_tokens: self.max_batch_tokens.max(1),
            max_running: self.max_running.max(1),
            max_waiting: self.max_waiting.max(1),
            prefix_caching: !self.no_prefix_cache,
            num_draft_tokens: self.spec.draft_tokens(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_memory;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_memory("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory("1048576").unwrap(), 1 << 20);
        assert!(parse_memory("0.1").unwrap() > 0);
        assert!(parse_memory("12 parsecs").is_err() && parse_memory("-3").is_err() && parse_memory("x").is_err());
    }
}
