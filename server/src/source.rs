//! Where the model comes from: a directory, or the built-in tiny model (synthesized once from a
//! fixed seed into the user's cache directory, with the real DeepSeek-V3/R1 tokenizer).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use moeserve_engine::Tokenizer;
use moeserve_model::synth::{self, SynthOptions};
use moeserve_model::{DeepSeekModel, LoadOptions};
use moeserve_quant::QuantSpec;

pub const TOKENIZER_JSON: &[u8] = include_bytes!("../../models/deepseek-v3/tokenizer.json");
pub const TOKENIZER_CONFIG: &[u8] = include_bytes!("../../models/deepseek-v3/tokenizer_config.json");

/// Bump when the built-in model's preset or generator changes.
const BUILTIN_VERSION: &str = "tiny-v1";
const BUILTIN_SEED: u64 = 0x5EED_0001;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json + safetensors) or a llama.cpp `deepseek2` GGUF file (split
    /// files: the first). Default: the built-in tiny random model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Compute dtype on CPU (activations; weights keep their resident format).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Resident weight formats: `q8_0`, `q4k`, `q6k`, `bf16`, `f32` for every projection, or per
    /// class, e.g. `experts=q4k,attn=q8_0,shared=q8_0,dense=q8_0,lm_head=q6k` (classes not named
    /// keep the checkpoint's format). Default: the checkpoint's own (FP8 stays FP8, bf16 stays bf16).
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<QuantSpec>,
}

fn parse_quant(s: &str) -> std::result::Result<QuantSpec, String> {
    QuantSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(format!("unsupported dtype `{other}` (f32, bf16)")),
    }
}

pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("MOESERVE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("moeserve");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/moeserve"),
        None => std::env::temp_dir().join("moeserve"),
    }
}

/// Write the tokenizer files next to a synthesized checkpoint.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON)
        .with_context(|| format!("writing tokenizer into {}", dir.display()))?;
    std::fs::write(dir.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    Ok(())
}

/// The built-in model's directory, synthesized on first use.
pub fn builtin_dir() -> Result<PathBuf> {
    let dir = cache_root().join(format!("builtin-{BUILTIN_VERSION}"));
    if dir.join("model.safetensors.index.json").exists() && dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    let parent = cache_root();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".builtin-{BUILTIN_VERSION}.{}", std::process::id()));
    let cfg = synth::preset("tiny")?;
    synth::write_checkpoint(&cfg, &tmp, &SynthOptions { seed: BUILTIN_SEED, shard_bytes: 16 << 20, ..Default::default() })?;
    write_tokenizer(&tmp)?;
    // another process may have won the race; either copy is identical
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

pub struct Loaded {
    pub model: DeepSeekModel,
    pub tokenizer: Option<Tokenizer>,
    pub dir: PathBuf,
}

pub fn load(args: &ModelArgs, load_mtp: bool) -> Result<Loaded> {
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => {
            eprintln!("warning: no --model given: using the built-in tiny DeepSeek-V3 with random weights; its output is noise");
            builtin_dir()?
        }
    };
    let opts = LoadOptions { dtype: args.dtype, load_mtp, quant: args.quant.clone().unwrap_or_default(), ..Default::default() };
    let model = DeepSeekModel::load(&dir, &opts).with_context(|| format!("loading model from {}", dir.display()))?;
    let report = model.load_report();
    eprintln!("loaded weights: {:.3} GB resident ({})", model.weight_bytes() as f64 / 1e9, report.lines().join(", "));
    // a GGUF file uses the tokenizer.json next to it (its embedded ggml vocabulary is not read)
    let tok_dir = if dir.is_file() { dir.parent().map(Path::to_path_buf).unwrap_or_default() } else { dir.clone() };
    let tokenizer = if tok_dir.join("tokenizer.json").exists() { Some(Tokenizer::from_dir(&tok_dir)?) } else { None };
    Ok(Loaded { model, tokenizer, dir })
}

/// Parse `0,12,7` (spaces allowed).
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u32>().with_context(|| format!("invalid token id `{x}` in --input-ids")))
        .collect()
}
