//! `moeserve synth`: a random-weight checkpoint in the official layout, for tests and benchmarks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use moeserve_model::synth::{self, SynthOptions};

use crate::source;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Preset: tiny (the built-in model), bench-small (~1.6 B params, 3.1 GB in bf16) or gpu-r1-slice
    /// (R1's layer shapes, 6 layers, 32 experts: ~14 GB with --fp8).
    #[arg(long)]
    pub preset: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Store projections as FP8 e4m3 with block scales (like the official R1 checkpoint).
    #[arg(long)]
    pub fp8: bool,
    /// FP8 scale block as ROWS,COLS.
    #[arg(long, default_value = "128,128")]
    pub fp8_block: String,
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
    /// Shard size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub shard_mb: usize,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = synth::preset(&args.preset)?;
    let block: Vec<usize> = args.fp8_block.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>()?;
    let [r, c] = block[..] else { bail!("--fp8-block must be ROWS,COLS") };
    if r == 0 || c == 0 {
        bail!("--fp8-block entries must be > 0");
    }
    let opts = SynthOptions { seed: args.seed, fp8_block: args.fp8.then_some([r, c]), shard_bytes: args.shard_mb.max(1) << 20 };
    let t = Instant::now();
    let report = synth::write_checkpoint(&cfg, &args.out, &opts)?;
    if cfg.vocab_size == 129280 {
        source::write_tokenizer(&args.out)?;
    }
    eprintln!(
        "wrote {} ({} shards, {:.2} GB, {:.3} B params) in {:.1} s",
        args.out.display(),
        report.files.len(),
        report.bytes as f64 / 1e9,
        report.params as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
