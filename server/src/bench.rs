//! `moeserve bench`: prefill and decode throughput (median of several runs), peak resident
//! memory, and the decode roofline from the active bytes per token and a bandwidth probe run
//! in the same process.

use std::time::Instant;

use anyhow::Result;
use clap::Args as ClapArgs;
use moeserve_core::DeepSeekConfig;
use moeserve_engine::{generate, GenerateRequest, SamplingParams};
use rand::{Rng, SeedableRng};

use crate::source::{self, ModelArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub gen_len: usize,
    /// Timed runs (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Weights read per decoded token: attention, dense MLPs, router + top-k + shared experts,
/// lm_head (the MTP layer is not used in plain decode).
pub fn active_params_per_token(c: &DeepSeekConfig) -> u64 {
    let (d, h) = (c.hidden_size as u64, c.num_attention_heads as u64);
    let (p, r, v, l) = (c.qk_nope_head_dim as u64, c.qk_rope_head_dim as u64, c.v_head_dim as u64, c.kv_lora_rank as u64);
    let q = match c.q_lora_rank {
        Some(qr) => d * qr as u64 + qr as u64 * h * (p + r),
        None => d * h * (p + r),
    };
    let attn = q + d * (l + r) + l * h * (p + v) + h * v * d;
    let mut total = c.vocab_size as u64 * d;
    for layer in 0..c.num_hidden_layers {
        total += attn;
        total += if c.is_moe_layer(layer) {
            let im = c.moe_intermediate_size as u64;
            c.n_routed_experts.unwrap_or(0) as u64 * d + 3 * d * im * (c.num_experts_per_tok + c.n_shared_experts) as u64
        } else {
            3 * d * c.intermediate_size as u64
        };
    }
    total
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Read bandwidth in bytes/s: best of 3 passes summing a 1 GiB buffer on all cores.
fn bandwidth_probe() -> f64 {
    let n: usize = 128 << 20;
    let buf: Vec<u64> = (0..n as u64).collect();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        // integer sums vectorize (float sums would be a serial dependency chain)
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(n.div_ceil(threads))
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((n * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

pub fn run(args: Args) -> Result<()> {
    let t = Instant::now();
    let loaded = source::load(&args.model, false)?;
    let model = &loaded.model;
    let cfg = &model.cfg;
    println!("model: {} ({})", loaded.dir.display(), model.describe());
    println!(
        "dtype: {:?}, threads: {}, load {:.2} s",
        model.dtype(),
        std::thread::available_parallelism().map_or(1, |t| t.get()),
        t.elapsed().as_secs_f64()
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let vocab = cfg.vocab_size.min(128_000) as u32;
    let prompt: Vec<u32> = std::iter::once(cfg.bos_token_id.unwrap_or(0))
        .chain((1..args.prompt_len.max(1)).map(|_| rng.gen_range(2..vocab)))
        .collect();
    let req = |max_tokens| GenerateRequest {
        prompt: prompt.clone(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_tokens: vec![],
    };

    generate(model, &GenerateRequest { prompt: prompt[..prompt.len().min(16)].to_vec(), ..req(4) }, |_| Ok(()))?; // warm-up
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..args.runs.max(1) {
        let s = generate(model, &req(args.gen_len.max(2)), |_| Ok(()))?;
        prefill.push(s.prompt_tokens as f64 / s.prefill.as_secs_f64());
        decode.push((s.generated - 1) as f64 / s.decode.as_secs_f64());
    }
    let (pp, tg) = (median(prefill.clone()), median(decode.clone()));
    println!(
        "prefill (pp{}): {pp:.1} tok/s   runs: {:?}",
        prompt.len(),
        prefill.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>()
    );
    println!(
        "decode  (tg{}): {tg:.2} tok/s   runs: {:?}",
        args.gen_len,
        decode.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>()
    );

    let elem = model.dtype().size_in_bytes() as u64;
    let active = active_params_per_token(cfg) * elem;
    let bw = bandwidth_probe();
    let roof = bw / active as f64;
    println!(
        "roofline: {:.0} MB active weights/token at {:.1} GB/s measured read bandwidth = {roof:.1} tok/s; decode reaches {:.2} of it",
        active as f64 / 1e6,
        bw / 1e9,
        tg / roof
    );
    if let Some(rss) = peak_rss_bytes() {
        println!("peak resident memory: {:.2} GB", rss as f64 / 1e9);
    }
    let kv = cfg.kv_layout();
    println!(
        "kv cache per token: latent {} B ({} layers x {} values x {elem} B) vs decompressed per-head K/V {} B ({:.1}x)",
        kv.bytes_per_token(elem as usize),
        kv.num_layers,
        kv.row_dim(),
        cfg.decompressed_kv_bytes_per_token(elem as usize),
        cfg.decompressed_kv_bytes_per_token(elem as usize) as f64 / kv.bytes_per_token(elem as usize) as f64
    );
    let r1 = DeepSeekConfig::from_json_str(include_str!("../../models/deepseek-r1-0528/config.json"), "R1-0528")?;
    println!(
        "kv cache per token for DeepSeek-R1 (bf16): latent {} B vs decompressed {} B ({:.1}x)",
        r1.kv_layout().bytes_per_token(2),
        r1.decompressed_kv_bytes_per_token(2),
        r1.decompressed_kv_bytes_per_token(2) as f64 / r1.kv_layout().bytes_per_token(2) as f64
    );
    Ok(())
}
