//! `moeserve generate`: stream generated text to stdout, or print the generated ids as JSON.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use moeserve_engine::{generate, GenerateRequest, SamplingParams, StreamDecoder};
use serde_json::json;

use crate::engine_args::SpecArgs;
use crate::source::{self, ModelArgs};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Decoded text, streamed as it is generated.
    Text,
    /// One JSON array of the generated token ids.
    Ids,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (BOS is prepended).
    #[arg(long, conflicts_with = "input_ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, used verbatim (e.g. 0,12,7).
    #[arg(long)]
    pub input_ids: Option<String>,
    /// Treat --prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy). Default: generation_config.json, else 0.6.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass. Default: generation_config.json, else 0.95.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens below min_p × the top probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past the end-of-sentence token.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    #[command(flatten)]
    pub spec: SpecArgs,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = source::load(&args.model, args.spec.draft_tokens() > 0)?;
    let (model, tok) = (&loaded.model, loaded.tokenizer.as_ref());
    let prompt: Vec<u32> = match (&args.prompt, &args.input_ids) {
        (_, Some(ids)) => source::parse_ids(ids)?,
        (Some(text), None) => {
            let tok = tok.context("this model has no tokenizer.json: pass --input-ids instead of --prompt")?;
            if args.chat {
                let rendered = tok.apply_chat_template(&[json!({"role": "user", "content": text})], true)?;
                tok.encode(&rendered)?
            } else {
                let mut ids: Vec<u32> = model.lead().cfg.bos_token_id.into_iter().collect();
                ids.extend(tok.encode(text)?);
                ids
            }
        }
        (None, None) => bail!("give --prompt TEXT or --input-ids 0,12,7"),
    };
    if args.output == Output::Text && tok.is_none() {
        bail!("this model has no tokenizer.json: use --output ids");
    }
    let defaults = SamplingParams::from_generation_config(&loaded.dir);
    let req = GenerateRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature.unwrap_or(defaults.temperature),
            top_p: args.top_p.unwrap_or(defaults.top_p),
            top_k: args.top_k.unwrap_or(defaults.top_k),
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            seed: args.seed,
            ..defaults
        },
        stop_tokens: if args.ignore_eos { vec![] } else { model.lead().cfg.eos_token_ids.clone() },
        num_draft_tokens: args.spec.draft_tokens(),
    };
    let mut ids = Vec::new();
    let mut dec = StreamDecoder::new();
    let mut stdout = std::io::stdout().lock();
    let stats = generate(model, &req, |id| {
        ids.push(id);
        if let (Output::Text, Some(tok)) = (args.output, tok) {
            if let Some(piece) = dec.push(tok, id)? {
                // a closed pipe ends the stream quietly
                let _ = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush());
            }
        }
        Ok(())
    })?;
    match (args.output, tok) {
        (Output::Text, Some(tok)) => {
            if let Some(rest) = dec.flush(tok)? {
                let _ = stdout.write_all(rest.as_bytes());
            }
            let _ = writeln!(stdout);
        }
        _ => {
            let _ = writeln!(stdout, "{}", serde_json::to_string(&ids)?);
        }
    }
    let decode_tps = if stats.generated > 1 { (stats.generated - 1) as f64 / stats.decode.as_secs_f64() } else { 0.0 };
    eprintln!(
        "[{} prompt tokens, {} generated ({:?}); prefill {:.1} ms, decode {:.1} tok/s]",
        stats.prompt_tokens,
        stats.generated,
        stats.finish,
        stats.prefill.as_secs_f64() * 1e3,
        decode_tps
    );
    if let Some(sp) = &stats.speculative {
        eprintln!(
            "[speculative: {} verify steps, {} drafted, {} accepted, mean accepted length {:.2}, acceptance per position {:?}]",
            sp.steps,
            sp.draft_tokens,
            sp.accepted_tokens,
            sp.mean_accepted_length(),
            sp.acceptance_rate_per_position().iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>()
        );
    }
    Ok(())
}
