//! `moeserve plan`: which TP/EP layouts hold a model on given devices, with how many sequences.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use moeserve_core::DeepSeekConfig;
use moeserve_hub::{HubOptions, RepoSpec};
use moeserve_plan::headers::{self, HeaderTotals};
use moeserve_plan::memory::{self, plan_layout, KvPlan, LayoutPlan, PlanOptions};
use moeserve_plan::{hardware, presets, DeviceKind, Hardware, Inventory, Layout, PlanError};
use moeserve_quant::QuantSpec;

use crate::engine_args::SpecMethod;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// A checkpoint directory (config.json; its safetensors headers when present), a Hub id
    /// ORG/NAME (a known repo, or a snapshot already in the Hub cache: nothing is downloaded), or
    /// a preset: deepseek-r1-0528, deepseek-v3, deepseek-v2-lite.
    #[arg(long)]
    pub model: String,
    /// Devices: COUNTxGPU (8xH200, 16xH100), NODESxCOUNTxGPU (2x8xH100), COUNTxSIZE (8x96GiB), or
    /// cpu (host RAM: --ram, else MemTotal).
    #[arg(long)]
    pub gpus: Option<String>,
    /// RAM of a CPU-only host (implies --gpus cpu), e.g. 768GiB.
    #[arg(long)]
    pub ram: Option<String>,
    /// Tokens each sequence must hold.
    #[arg(long, default_value_t = 131072)]
    pub context: usize,
    /// Resident weight formats, as for serve: q8_0|q4k|q6k|bf16|f32, or per class
    /// (experts=q4k,attn=q8_0,...). Default: the checkpoint's own (FP8 stays FP8).
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<QuantSpec>,
    /// Attention tensor-parallel size (default: the best fitting layout; with only --ep, devices / EP).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Expert-parallel size (with only --tp: devices / TP).
    #[arg(long)]
    pub ep: Option<usize>,
    /// Sequences a layout must hold at --context to fit (also sizes the logits buffers; default 64).
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Tokens per engine step (sizes the activation reserve).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Compute dtype, also the KV cache's: bf16 (GPU default) or f32 (CPU default).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Load the MTP layer for speculative decoding (its weights and one more KV layer).
    #[arg(long, value_enum)]
    pub speculative: Option<SpecMethod>,
    /// Fraction of each device's memory the server may use (like vLLM's gpu_memory_utilization).
    #[arg(long, default_value_t = memory::DEFAULT_UTILIZATION)]
    pub memory_utilization: f64,
}

/// `writeln!` into the report string (printed at once: a closed pipe is not an error).
macro_rules! w {
    ($o:expr) => {
        $o.push('\n')
    };
    ($o:expr, $($t:tt)*) => {{
        let _ = writeln!($o, $($t)*);
    }};
}

fn parse_quant(s: &str) -> std::result::Result<QuantSpec, String> {
    QuantSpec::parse(s).map_err(|e| e.to_string())
}

struct Source {
    title: String,
    cfg: DeepSeekConfig,
    headers: Option<std::result::Result<HeaderTotals, String>>,
}

fn from_dir(dir: &Path, title: String) -> Result<Source> {
    let cfg = DeepSeekConfig::from_file(&dir.join("config.json"))?;
    let has_weights = dir.join("model.safetensors.index.json").exists() || dir.join("model.safetensors").exists();
    let headers = has_weights.then(|| headers::read(dir, &cfg).map_err(|e| e.to_string()));
    Ok(Source { title, cfg, headers })
}

fn resolve(model: &str) -> Result<Source> {
    let path = PathBuf::from(model);
    if path.is_dir() {
        return from_dir(&path, path.display().to_string());
    }
    if path.is_file() {
        bail!("--model {model}: plan reads a checkpoint directory's config.json (GGUF files are not supported)");
    }
    if let Some(p) = presets::find(model) {
        return Ok(Source { title: format!("{} (preset {})", p.title, p.name), cfg: p.config()?, headers: None });
    }
    if let Some(spec) = RepoSpec::parse(model) {
        // only what the Hub cache already holds: a plan never downloads weights
        let opts = HubOptions { offline: true, quiet: true, ..HubOptions::from_env() };
        if let Ok(dir) = moeserve_hub::snapshot(&spec, &opts) {
            return from_dir(&dir, format!("{model} (Hub cache {})", dir.display()));
        }
    }
    Err(PlanError::Model {
        name: model.to_string(),
        msg: format!(
            "not a directory, a preset or a cached Hub snapshot (presets: {}; Hub ids: {})",
            presets::names().join(", "),
            presets::MODELS.iter().flat_map(|p| p.repos.iter().copied()).collect::<Vec<_>>().join(", ")
        ),
    }
    .into())
}

/// GiB with two decimals; MiB below 1 GiB so that small classes (norms) do not read as 0.
fn gib(b: u64) -> String {
    gib_signed(b as i64)
}

fn gib_signed(b: i64) -> String {
    if b.unsigned_abs() < 1 << 30 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(args: Args) -> Result<()> {
    let ram = match &args.ram {
        Some(r) => Some(hardware::parse_size(r).with_context(|| format!("--ram `{r}`: expected a size such as 768GiB"))?),
        None => None,
    };
    let gpus = match (&args.gpus, ram) {
        (Some(g), _) => g.clone(),
        (None, Some(_)) => "cpu".to_string(),
        (None, None) => bail!("--gpus is required (e.g. 8xH200, 16xH100, 2x8xH100, cpu)"),
    };
    let hw = Hardware::parse(&gpus, ram)?;
    let src = resolve(&args.model)?;
    let cfg = &src.cfg;
    if args.context == 0 || args.context > cfg.max_position_embeddings {
        bail!("--context {} must be in 1..={} (the model's max_position_embeddings)", args.context, cfg.max_position_embeddings);
    }
    if !(args.memory_utilization > 0.0 && args.memory_utilization <= 1.0) {
        bail!("--memory-utilization must be in (0, 1]");
    }
    let mut opts = PlanOptions::for_hardware(&hw);
    opts.context = args.context;
    opts.page_size = args.page_size.max(1);
    opts.max_batch_tokens = args.max_batch_tokens.max(1);
    opts.mtp = args.speculative.is_some() && cfg.has_mtp();
    opts.utilization = args.memory_utilization;
    opts.spec = args.quant.clone().unwrap_or_default();
    if let Some(n) = args.max_seqs {
        opts.max_seqs = n.max(1);
        opts.require_seqs = n.max(1) as u64;
    }
    opts.dtype_bytes = match args.dtype.as_deref() {
        None => opts.dtype_bytes,
        Some("bf16" | "bfloat16") => 2,
        Some("f32" | "float32") => 4,
        Some(other) => bail!("unsupported --dtype `{other}` (bf16, f32)"),
    };
    let world = hw.devices;
    let chosen = match (args.tp, args.ep) {
        (None, None) => None,
        (tp, ep) => {
            let tp = tp.unwrap_or_else(|| world / ep.unwrap_or(1).max(1));
            let ep = ep.unwrap_or_else(|| world / tp.max(1));
            Some(Layout::new(tp, ep, world).map_err(|msg| PlanError::Layout { tp, ep, world, msg })?)
        }
    };

    let inv = Inventory::from_config(cfg);
    let kv = KvPlan::new(cfg, &opts);
    let mut plans = memory::plan_all(cfg, &inv, &hw, &opts);
    if let Some(l) = chosen.filter(|l| !plans.iter().any(|p| p.layout == *l)) {
        plans.push(plan_layout(cfg, &inv, &hw, l, &opts, &kv));
    }
    let mut o = String::new();
    print_header(&mut o, &src, &inv, &hw, &opts, &kv);
    print_layouts(&mut o, &plans, &hw, &opts, chosen);
    let detail = match chosen {
        Some(l) => plans.iter().find(|p| p.layout == l),
        None => memory::best(&plans).or_else(|| plans.iter().find(|p| p.invalid.is_none())),
    };
    if let Some(p) = detail {
        print_detail(&mut o, p, &opts);
    }
    let _ = std::io::stdout().write_all(o.as_bytes());
    Ok(())
}

fn print_header(o: &mut String, src: &Source, inv: &Inventory, hw: &Hardware, opts: &PlanOptions, kv: &KvPlan) {
    let cfg = &src.cfg;
    w!(o, "model       {}", src.title);
    let dense = (0..cfg.num_hidden_layers).filter(|&i| !cfg.is_moe_layer(i)).count();
    let moe = match cfg.n_routed_experts {
        Some(e) => format!(", {e} routed experts top-{} + {} shared", cfg.num_experts_per_tok, cfg.n_shared_experts),
        None => String::new(),
    };
    w!(
        o,
        "            {}: {} layers ({dense} dense) + {} MTP layer{}{moe}, {} heads, vocab {}",
        cfg.model_type.as_str(),
        cfg.num_hidden_layers,
        cfg.num_nextn_predict_layers,
        if cfg.num_nextn_predict_layers == 1 { "" } else { "s" },
        cfg.num_attention_heads,
        cfg.vocab_size
    );
    let si = |n: u64, unit: &str| {
        if n >= 1_000_000_000 {
            format!("{:.2} G{unit}", n as f64 / 1e9)
        } else {
            format!("{:.2} M{unit}", n as f64 / 1e6)
        }
    };
    // parameter counts: B(illion) as on model cards
    let params =
        |n: u64| if n >= 1_000_000_000 { format!("{:.2} B", n as f64 / 1e9) } else { format!("{:.2} M", n as f64 / 1e6) };
    w!(
        o,
        "parameters  {} = {} main + {} MTP",
        params(inv.params(None)),
        params(inv.params(Some(false))),
        params(inv.params(Some(true)))
    );
    w!(
        o,
        "checkpoint  {} ({}), {} tensors: {} (from config.json)",
        si(inv.source_bytes(), "B"),
        gib(inv.source_bytes()),
        thousands(inv.tensor_files()),
        inv.source_formats()
    );
    match &src.headers {
        Some(Ok(h)) => {
            let same = if h.bytes == inv.source_bytes() { "matches" } else { "DIFFERS from the config-derived count" };
            w!(
                o,
                "            safetensors headers: {}, {} tensors ({same}){}",
                si(h.bytes, "B"),
                thousands(h.tensors),
                if h.unclassified.is_empty() { String::new() } else { format!(", {} unclassified", h.unclassified.len()) }
            );
        }
        Some(Err(e)) => w!(o, "            safetensors headers not read: {e}"),
        None => {}
    }
    let quant =
        if opts.spec.targets.is_empty() { "checkpoint formats (--quant changes them)".to_string() } else { "per --quant".into() };
    let mtp = if opts.mtp { "MTP layer loaded" } else { "MTP layer not loaded (--speculative mtp loads it)" };
    w!(o, "resident    {quant}; router in f32; {mtp}");
    w!(o, "hardware    {}", hw.describe());
    let dt = if kv.elem_bytes == 2 { "bf16" } else { "f32" };
    w!(
        o,
        "KV cache    latent: ({} + {}) values x {} layers x {} B ({dt}) = {} B/token; page of {} tokens = {} B",
        cfg.kv_lora_rank,
        cfg.qk_rope_head_dim,
        kv.layers,
        kv.elem_bytes,
        thousands(kv.bytes_per_token),
        kv.page_size,
        thousands(kv.bytes_per_page)
    );
    w!(
        o,
        "            a {}-token sequence = {} pages = {}; replicated on every rank",
        thousands(opts.context as u64),
        thousands(kv.pages_per_seq),
        gib(kv.bytes_per_seq)
    );
    w!(o, "            (MLA's latent is shared by all heads, so a TP split cannot divide it)");
    w!(o,
        "reserve     per rank: {} fixed + activations ({} batched tokens) + logits ({} seqs x vocab x 4 B x 2); usable = {:.2} x {}",
        gib(opts.fixed_overhead),
        opts.max_batch_tokens,
        opts.max_seqs,
        opts.utilization,
        gib(hw.device_bytes)
    );
}

fn print_layouts(o: &mut String, plans: &[LayoutPlan], hw: &Hardware, opts: &PlanOptions, chosen: Option<Layout>) {
    w!(o);
    let unit = if hw.kind == DeviceKind::Cpu { "host" } else { "devices" };
    w!(o, "layouts on {} {unit} (expert-TP = devices/EP ranks per expert)", hw.devices);
    w!(o, "TP is all devices or 1 (attention replicated); every rank serves the same sequences and keeps their latent KV");
    let seqs_col = format!("seqs@{}", opts.context);
    w!(
        o,
        "{:>4} {:>4} {:>9} {:>14} {:>12} {:>14} {:>13} {:>5}  note",
        "TP",
        "EP",
        "expert-TP",
        "weights/rank",
        "reserve",
        "KV/rank",
        seqs_col,
        "fits"
    );
    let best = memory::best(plans).map(|p| p.layout);
    for p in plans {
        let l = p.layout;
        let mut notes = Vec::new();
        if let Some(why) = &p.invalid {
            notes.push(why.clone());
        } else if p.kv_budget_per_rank <= 0 {
            notes.push("weights + reserve exceed usable memory".into());
        } else if !p.fits {
            notes.push(format!("KV holds {} sequences, {} required", p.total_seqs, opts.require_seqs));
        }
        if p.cross_node_tp {
            notes.push("TP spans nodes".into());
        }
        if Some(l) == chosen {
            notes.push("chosen".into());
        } else if chosen.is_none() && Some(l) == best {
            notes.push("best".into());
        }
        let (w, kv, seqs) = if p.invalid.is_some() {
            ("-".to_string(), "-".to_string(), "-".to_string())
        } else {
            (gib(p.weight_bytes_per_rank), gib_signed(p.kv_budget_per_rank), p.total_seqs.to_string())
        };
        let line = format!(
            "{:>4} {:>4} {:>9} {:>14} {:>12} {:>14} {:>13} {:>5}  {}",
            l.tp,
            l.ep,
            l.moe_tp(),
            w,
            gib(p.reserve.total()),
            kv,
            seqs,
            if p.fits { "yes" } else { "no" },
            notes.join("; ")
        );
        w!(o, "{}", line.trim_end());
    }
}

fn print_detail(o: &mut String, p: &LayoutPlan, opts: &PlanOptions) {
    let l = p.layout;
    w!(o);
    w!(o, "weights for TP={} EP={} (whole model -> the fullest rank)", l.tp, l.ep);
    w!(o, "{:<22} {:<12} {:>14} {:>14} {:>14}", "class", "format", "params", "total", "per rank");
    for s in &p.weights {
        let name = if s.mtp { format!("mtp: {}", s.class.name()) } else { s.class.name().to_string() };
        w!(
            o,
            "{:<22} {:<12} {:>14} {:>14} {:>14}",
            name,
            s.format.name(),
            thousands(s.params),
            gib(s.bytes),
            gib(s.bytes_per_rank)
        );
    }
    let total: u64 = p.weights.iter().map(|s| s.bytes).sum();
    w!(o, "{:<22} {:<12} {:>14} {:>14} {:>14}", "total", "", "", gib(total), gib(p.weight_bytes_per_rank));
    let r = p.reserve;
    w!(
        o,
        "reserve per rank: {} = {} fixed + {} activations + {} logits",
        gib(r.total()),
        gib(r.fixed),
        gib(r.activations),
        gib(r.logits)
    );
    w!(
        o,
        "usable {} - weights {} - reserve {} = KV {} per rank -> {} sequences of {} tokens",
        gib(p.usable),
        gib(p.weight_bytes_per_rank),
        gib(r.total()),
        gib_signed(p.kv_budget_per_rank),
        p.total_seqs,
        opts.context
    );
}
