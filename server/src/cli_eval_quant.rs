//! `moeserve eval-quant`: quality of a quantization against the checkpoint's own format (mean KL
//! divergence, top-1 agreement, perplexity delta) and what each keeps resident.

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use moeserve_model::{eval, DeepSeekModel};
use moeserve_quant::QuantSpec;
use rand::{Rng, SeedableRng};

use crate::source::{self, ModelArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The model and the quantization to evaluate (`--quant`); the reference is the same model in
    /// the checkpoint's own format.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token windows.
    #[arg(long, default_value_t = 4)]
    pub windows: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    pub window_len: usize,
    /// Text whose tokens fill the windows (needs the model's tokenizer); default: fixed-seed random
    /// token ids (enough for random-weight synthetic checkpoints).
    #[arg(long)]
    pub text_file: Option<std::path::PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let spec = args.model.quant.clone().context("eval-quant needs --quant (e.g. q8_0, q4k, experts=q4k,attn=q8_0)")?;
    if args.model.tp * args.model.ep > 1 {
        anyhow::bail!("eval-quant runs on one rank: drop --tensor-parallel-size / --expert-parallel-size");
    }
    let quantized = source::load(&args.model, false)?;
    let reference_args = ModelArgs { quant: None, ..args.model.clone() };
    let reference = source::load(&reference_args, false)?;
    let cfg = &reference.model.lead().cfg;
    let tokens: Vec<u32> = match (&args.text_file, &reference.tokenizer) {
        (Some(f), Some(tok)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            tok.encode(&text)?
        }
        (Some(_), None) => anyhow::bail!("--text-file needs a tokenizer.json in the model directory"),
        (None, _) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
            (0..args.windows * args.window_len).map(|_| rng.gen_range(2..cfg.vocab_size as u32)).collect()
        }
    };
    let windows: Vec<Vec<u32>> =
        tokens.chunks(args.window_len.max(2)).filter(|w| w.len() >= 2).take(args.windows.max(1)).map(<[u32]>::to_vec).collect();
    let q = eval::compare(reference.model.lead(), quantized.model.lead(), &windows)?;
    let gb = |m: &DeepSeekModel| m.weight_bytes() as f64 / 1e9;
    println!("reference: checkpoint format, {:.3} GB of weights", gb(reference.model.lead()));
    println!(
        "quantized: {}, {:.3} GB of weights ({:.2}x)",
        describe(&spec),
        gb(quantized.model.lead()),
        gb(quantized.model.lead()) / gb(reference.model.lead())
    );
    println!(
        "{} windows x {} tokens: mean KLD {:.6} (max {:.4}), top-1 agreement {:.2}%, PPL {:.4} -> {:.4} ({:+.3}%)",
        q.windows,
        q.positions / q.windows.max(1),
        q.mean_kld,
        q.max_kld,
        100.0 * q.top1_agreement,
        q.ppl_reference,
        q.ppl_quantized,
        100.0 * (q.ppl_quantized / q.ppl_reference - 1.0)
    );
    Ok(())
}

fn describe(spec: &QuantSpec) -> String {
    spec.targets.iter().map(|(c, t)| format!("{}={:?}", c.name(), t)).collect::<Vec<_>>().join(",")
}
