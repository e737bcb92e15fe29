//! Where the model comes from: a directory, a Hugging Face Hub model id (downloaded once into the
//! standard Hub cache), or the built-in tiny model (synthesized once from a fixed seed into the
//! user's cache directory, with the real DeepSeek-V3/R1 tokenizer).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use moeserve_engine::Tokenizer;
use moeserve_hub::{HubOptions, RepoSpec};
use moeserve_model::synth::{self, SynthOptions};
use moeserve_model::{LoadOptions, ModelGroup};
use moeserve_quant::QuantSpec;

pub const TOKENIZER_JSON: &[u8] = include_bytes!("../../models/deepseek-v3/tokenizer.json");
pub const TOKENIZER_CONFIG: &[u8] = include_bytes!("../../models/deepseek-v3/tokenizer_config.json");

/// Bump when the built-in model's preset or generator changes.
const BUILTIN_VERSION: &str = "tiny-v1";
const BUILTIN_SEED: u64 = 0x5EED_0001;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json + safetensors), a llama.cpp `deepseek2` GGUF file (split
    /// files: the first), or a Hugging Face Hub id ORG/NAME[@REVISION] (honours HF_HOME,
    /// HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE). Default: the built-in tiny random model.
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
    /// Split attention heads, dense MLPs, shared experts and lm_head over this many ranks (1 or
    /// the group size). Ranks are threads of this process, each holding only its part.
    #[arg(long = "tensor-parallel-size", visible_alias = "tp", default_value_t = 1)]
    pub tp: usize,
    /// Split the routed experts over this many expert groups (divides the group size, which is
    /// max(tp, ep)); tokens are dispatched to the ranks that hold their experts.
    #[arg(long = "expert-parallel-size", visible_alias = "ep", default_value_t = 1)]
    pub ep: usize,
    /// `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`; use `--dtype bf16` there).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::new_cuda(n).with_context(|| {
                let hint = if cfg!(feature = "cuda") { "" } else { " (this binary was built without `--features cuda`)" };
                format!("--device cuda:{n}: cannot open the CUDA device{hint}")
            }),
        }
    }
}

fn parse_device(s: &str) -> std::result::Result<DeviceSpec, String> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
            _ => Err(format!("unknown device `{other}` (cpu, cuda, cuda:N)")),
        },
    }
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
    pub model: ModelGroup,
    pub tokenizer: Option<Tokenizer>,
    pub dir: PathBuf,
}

/// The Hub model `--model` names: not an existing path, but shaped like `ORG/NAME[@REVISION]`.
pub fn hub_spec(model: &Path) -> Option<RepoSpec> {
    if model.exists() {
        return None;
    }
    RepoSpec::parse(model.to_str()?)
}

/// `--model` as a directory: a Hub id is resolved through the cache (downloading what is missing).
pub fn model_dir(model: &Path) -> Result<PathBuf> {
    let Some(spec) = hub_spec(model) else { return Ok(model.to_path_buf()) };
    let name = model.display();
    moeserve_hub::snapshot(&spec, &HubOptions::from_env())
        .with_context(|| format!("--model {name}: not a local directory; tried the Hugging Face Hub"))
}

/// The name the server reports for `--model`: `ORG/NAME` for a Hub id, else the directory's name.
pub fn model_name(model: &Path) -> String {
    match hub_spec(model) {
        Some(spec) => spec.repo_id,
        None => model.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned()),
    }
}

pub fn load(args: &ModelArgs, load_mtp: bool) -> Result<Loaded> {
    let dir = match &args.model {
        Some(d) => model_dir(d)?,
        None => {
            eprintln!("warning: no --model given: using the built-in tiny DeepSeek-V3 with random weights; its output is noise");
            builtin_dir()?
        }
    };
    let opts = LoadOptions {
        dtype: args.dtype,
        device: args.device.open()?,
        load_mtp,
        quant: args.quant.clone().unwrap_or_default(),
        ..Default::default()
    };
    if args.device != DeviceSpec::Cpu && args.tp.max(args.ep) > 1 {
        // the NCCL communicator exists (moeserve_kernels::nccl), per-device latent-cache replicas do not yet
        anyhow::bail!(
            "--tensor-parallel-size / --expert-parallel-size run on CPU ranks; on GPUs each rank would need its own \
             latent-cache replica on its device, which is not implemented yet"
        );
    }
    let model =
        ModelGroup::load(&dir, &opts, args.tp, args.ep).with_context(|| format!("loading model from {}", dir.display()))?;
    for (r, m) in model.ranks().iter().enumerate() {
        let rank = if model.world_size() > 1 { format!("rank {r}: ") } else { String::new() };
        let lines = m.load_report().lines().join(", ");
        eprintln!("{rank}loaded weights: {:.3} GB resident ({lines})", m.weight_bytes() as f64 / 1e9);
    }
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
