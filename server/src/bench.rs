//! `moeserve bench`: prefill and decode throughput (median of several runs), peak resident
//! memory, and the decode roofline from the active bytes per token and a bandwidth probe run
//! in the same process. With `--speculative mtp` it also decodes speculatively (against the plain
//! decode of the same run) and measures a K+1-token verify step against a 1-token step; with
//! `--profile`, the time of each stage of a decode step.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use clap::Args as ClapArgs;
use moeserve_core::{profile, DeepSeekConfig};
use moeserve_engine::{generate, Engine, Event, GenerateRequest, Request, SamplingParams};
use moeserve_model::{ForwardBatch, LatentKv, ModelGroup, Mtp};
use rand::{Rng, SeedableRng};

use crate::engine_args::EngineArgs;
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
    /// Also run the batching engine with this many concurrent requests per level (e.g. 1,4,16,64)
    /// and print aggregate decode tok/s and time-to-first-token percentiles.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Only the kernel benchmark: every weight format at batch 1..32 on one matrix, against the
    /// read bandwidth measured in the same run (no model is loaded).
    #[arg(long)]
    pub kernels: bool,
    /// After the timed runs, one more generation with every stage of a step timed: milliseconds
    /// for each stage of the prefill and per decoded token, and its share of the step.
    #[arg(long)]
    pub profile: bool,
    /// Alternate the decode steps of the timed runs (and the engine's decode-only steps at each
    /// `--concurrency` level) between two versions of the code under evaluation (it branches on
    /// `moeserve_core::ab::variant()`), and print the ratio of their mean step times: resolves a
    /// 1 % change on a machine whose bandwidth drifts more.
    #[arg(long)]
    pub ab: bool,
    /// Formats of the kernel benchmark (default: all of f32,bf16,fp8,q8_0,q4k,q6k).
    #[arg(long, value_delimiter = ',')]
    pub kernel_formats: Vec<String>,
    /// Batch sizes of the kernel benchmark.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128")]
    pub kernel_batches: Vec<usize>,
    /// Matrix of the kernel benchmark, rows x cols.
    #[arg(long, default_value = "8192x4096", value_parser = parse_shape)]
    pub kernel_shape: (usize, usize),
    /// Context lengths of the kernel benchmark's decode attention table (DeepSeek-R1's shape:
    /// 128 heads over a 512 + 64 wide latent cache, 1 and 2 queries per head); 0: no table.
    #[arg(long, value_delimiter = ',', default_value = "1024,8192,32768")]
    pub kernel_contexts: Vec<usize>,
    /// Shape of that table, heads x latent x rope (default DeepSeek-R1's; bench-small: 16x256x32).
    #[arg(long, default_value = "128x512x64", value_parser = parse_attention_shape)]
    pub kernel_attention_shape: (usize, usize, usize),
    /// kv_b of the kernel benchmark's MLA absorption table, heads x nope x v x latent (default
    /// DeepSeek-R1's; bench-small: 16x64x64x256); 0: no table.
    #[arg(long, default_value = "128x128x128x512", value_parser = parse_absorption_shape)]
    pub kernel_absorption_shape: (usize, usize, usize, usize),
    /// Engine settings for the concurrency runs (the KV budget is capped at what the runs need).
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// (current, peak) resident set size of this process.
fn rss_bytes() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Read bandwidth in bytes/s (best of 3 × 3 passes over a 256 MiB buffer on the kernels' thread
/// pool), taken right after each decode run for that run's roofline. This VM-class machine
/// switches between bandwidth states for seconds at a time (one probe read 35 GB/s, the next
/// process's 55), so one probe at the end can belong to another state than the runs it divides.
/// 256 MiB is 8× the largest last-level cache here, and quick enough to take after every run.
fn bandwidth_probe() -> f64 {
    moeserve_cpu::bandwidth::read_bandwidth(256 << 20, 3)
}

fn parse_attention_shape(s: &str) -> Result<(usize, usize, usize), String> {
    let v: Vec<usize> =
        s.split('x').map(|p| p.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| format!("{s}: {e}"))?;
    match v[..] {
        [h, l, r] if h > 0 && l > 0 => Ok((h, l, r)),
        _ => Err(format!("{s}: expected heads x latent x rope, e.g. 128x512x64")),
    }
}

/// `0` (no table) as all zeros.
fn parse_absorption_shape(s: &str) -> Result<(usize, usize, usize, usize), String> {
    if s.trim() == "0" {
        return Ok((0, 0, 0, 0));
    }
    let v: Vec<usize> =
        s.split('x').map(|p| p.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| format!("{s}: {e}"))?;
    match v[..] {
        [h, p, v, l] if h > 0 && p > 0 && v > 0 && l > 0 => Ok((h, p, v, l)),
        _ => Err(format!("{s}: expected heads x nope x v x latent, e.g. 128x128x128x512, or 0")),
    }
}

fn parse_shape(s: &str) -> std::result::Result<(usize, usize), String> {
    let (r, c) = s.split_once('x').ok_or_else(|| format!("`{s}`: expected ROWSxCOLS"))?;
    let n = |v: &str| v.parse::<usize>().map_err(|e| format!("`{s}`: {e}"));
    Ok((n(r)?, n(c)?))
}

/// `bench --kernels`: the per-format kernel table.
fn bench_kernels(args: &Args) -> Result<()> {
    use moeserve_cpu::Format;
    let all = [Format::F32, Format::Bf16, Format::Fp8 { block: [128, 128] }, Format::Q8_0, Format::Q4K, Format::Q6K];
    let mut formats = Vec::new();
    for name in &args.kernel_formats {
        match all.iter().find(|f| f.name() == name) {
            Some(&f) => formats.push(f),
            None => anyhow::bail!("--kernel-formats: unknown format `{name}` (one of f32, bf16, fp8, q8_0, q4k, q6k)"),
        }
    }
    if formats.is_empty() {
        formats = all.to_vec();
    }
    let (rows, cols) = args.kernel_shape;
    let backend = moeserve_cpu::backend();
    let report = moeserve_cpu::bench::run(&formats, &args.kernel_batches, rows, cols, 3, 1 << 30, backend);
    println!(
        "kernels: {backend:?}, {} threads, weight [{rows}, {cols}], read bandwidth {:.1} GB/s (best of 5 over 1 GiB); \
         each row also against a probe right after it (`bw now`: this machine class switches bandwidth states)",
        rayon::current_num_threads(),
        report.read_bandwidth / 1e9
    );
    println!(
        "{:<9} {:>5} {:>10} {:>9} {:>12} {:>10} {:>8} {:>10}",
        "format", "batch", "time (us)", "GB/s", "of read bw", "vs batch 1", "bw now", "of bw now"
    );
    for r in &report.results {
        println!(
            "{:<9} {:>5} {:>10.1} {:>9.2} {:>12.2} {:>10.2} {:>8.1} {:>10.2}",
            r.format,
            r.batch,
            r.seconds * 1e6,
            r.bytes_per_s / 1e9,
            r.bytes_per_s / report.read_bandwidth,
            r.vs_batch1,
            r.read_bandwidth / 1e9,
            r.bytes_per_s / r.read_bandwidth
        );
    }
    let contexts: Vec<usize> = args.kernel_contexts.iter().copied().filter(|&c| c > 0).collect();
    if !contexts.is_empty() {
        let (heads, latent, rope) = args.kernel_attention_shape;
        let rows = moeserve_cpu::bench::run_attention(&contexts, &[1, 2], (heads, latent, rope), 5, backend);
        println!("decode attention ({heads} heads, cache rows of {latent} + {rope}), best of 5:");
        println!(
            "{:>5} {:>8} {:>7} {:>10} {:>13} {:>8} {:>10} {:>7}",
            "cache", "context", "queries", "time (us)", "cache GB/s", "GFMA/s", "vs 1 query", "vs f32"
        );
        let half = rows.len() / 2;
        for (i, pair) in rows.chunks(2).enumerate() {
            for (j, r) in pair.iter().enumerate() {
                // the bf16 rows follow the f32 ones in the same order
                let vs_f32 = if r.bf16 { format!("{:.2}", r.seconds / rows[2 * i + j - half].seconds) } else { "-".into() };
                println!(
                    "{:>5} {:>8} {:>7} {:>10.1} {:>13.2} {:>8.1} {:>10.2} {:>7}",
                    if r.bf16 { "bf16" } else { "f32" },
                    r.tokens,
                    r.queries,
                    r.seconds * 1e6,
                    r.bytes_per_s / 1e9,
                    r.fma_per_s / 1e9,
                    r.seconds / pair[0].seconds,
                    vs_f32
                );
            }
        }
    }
    let shape = args.kernel_absorption_shape;
    if shape.0 > 0 {
        let (heads, nope, v, latent) = shape;
        let rows = moeserve_cpu::bench::run_absorption(shape, 5, 1 << 30, backend);
        println!(
            "MLA absorption products of one decode step and layer ({heads} heads, kv_b {nope} + {v} rows x {latent}), best of 5:"
        );
        println!("{:<9} {:>10} {:>9} {:>12} {:>8} {:>10}", "kv_b", "time (us)", "GB/s", "of read bw", "bw now", "of bw now");
        for r in &rows {
            println!(
                "{:<9} {:>10.1} {:>9.2} {:>12.2} {:>8.1} {:>10.2}",
                r.format,
                r.seconds * 1e6,
                r.bytes_per_s / 1e9,
                r.bytes_per_s / report.read_bandwidth,
                r.read_bandwidth / 1e9,
                r.bytes_per_s / r.read_bandwidth
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// `bench --kernels --device cuda`: the CUDA kernels against the copy bandwidth and matmul rate.
#[cfg(feature = "cuda")]
fn bench_cuda_kernels(args: &Args) -> Result<()> {
    let dev = args.model.device.open()?;
    moeserve_kernels::cuda::bench::run(&dev)?.print();
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda_kernels(_: &Args) -> Result<()> {
    anyhow::bail!("bench --kernels --device cuda: this binary was built without `--features cuda`")
}

pub fn run(args: Args) -> Result<()> {
    if args.kernels {
        if args.model.device != source::DeviceSpec::Cpu {
            return bench_cuda_kernels(&args);
        }
        bench_kernels(&args)?;
        return Ok(());
    }
    let t = Instant::now();
    let spec_k = args.engine.spec.draft_tokens();
    let loaded = source::load(&args.model, spec_k > 0)?;
    let rss_loaded = rss_bytes().map_or(0, |r| r.0);
    let model = &loaded.model;
    let lead = model.lead();
    let cfg = &lead.cfg;
    println!("model: {} ({})", loaded.dir.display(), lead.describe());
    println!(
        "dtype: {:?}, threads: {}, ranks: {}, load {:.2} s",
        lead.dtype(),
        std::thread::available_parallelism().map_or(1, |t| t.get()),
        model.world_size(),
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
        num_draft_tokens: 0,
    };

    generate(model, &GenerateRequest { prompt: prompt[..prompt.len().min(16)].to_vec(), ..req(4) }, |_| Ok(()))?; // warm-up
    moeserve_core::ab::enable(args.ab);
    let (mut prefill, mut decode, mut read_bw) = (Vec::new(), Vec::new(), Vec::new());
    let mut plain_ids = Vec::new();
    for _ in 0..args.runs.max(1) {
        plain_ids.clear();
        let s = generate(model, &req(args.gen_len.max(2)), |t| {
            plain_ids.push(t);
            Ok(())
        })?;
        prefill.push(s.prompt_tokens as f64 / s.prefill.as_secs_f64());
        decode.push((s.generated - 1) as f64 / s.decode.as_secs_f64());
        read_bw.push(bandwidth_probe());
    }
    moeserve_core::ab::enable(false);
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

    if let Some(r) = moeserve_core::ab::report() {
        println!("{}", ab_line("A/B (alternate decode steps)", &r));
    }
    if args.profile {
        profile_decode(model, &req(args.gen_len.max(2)))?;
    }
    if spec_k > 0 {
        bench_speculative(model, &req(args.gen_len.max(2)), spec_k, args.runs.max(1), tg, &plain_ids)?;
    }

    // (the bandwidth probes' buffers are freed after each: "now" excludes them; the peak would
    // include one only where the model's own peak is below it plus 256 MiB)
    if let Some((rss, peak)) = rss_bytes() {
        println!(
            "resident memory: {:.2} GB after loading, {:.2} GB now, {:.2} GB peak; weights {:.2} GB ({})",
            rss_loaded as f64 / 1e9,
            rss as f64 / 1e9,
            peak as f64 / 1e9,
            model.weight_bytes() as f64 / 1e9,
            lead.load_report().lines().join(", ")
        );
    }
    let elem = lead.dtype().size_in_bytes() as u64;
    // every rank reads its own share (and its replicas) per token
    let active = model.ranks().iter().map(|m| m.active_bytes_per_token() as u64).sum::<u64>();
    // each run against the bandwidth probed right after it
    let fractions: Vec<f64> = decode.iter().zip(&read_bw).map(|(tg, bw)| tg * active as f64 / bw).collect();
    let bw = median(read_bw.clone());
    let (lo, hi) = read_bw.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    println!(
        "roofline: {:.0} MB of weights read per token at {:.1} GB/s measured read bandwidth (median; {:.1}–{:.1} GB/s, probed after each decode run) = {:.1} tok/s; decode reaches {:.2} of it (median of the runs' own fractions: {:?})",
        active as f64 / 1e6,
        bw / 1e9,
        lo / 1e9,
        hi / 1e9,
        bw / active as f64,
        median(fractions.clone()),
        fractions.iter().map(|f| format!("{f:.2}")).collect::<Vec<_>>()
    );
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
    if !args.concurrency.is_empty() {
        bench_concurrency(loaded.model, &args, tg)?;
    }
    Ok(())
}

/// One more greedy generation with the stage spans on: each stage's time in the prefill step,
/// then per decode step (the spans are read and reset when the prefill's token comes out).
fn profile_decode(model: &ModelGroup, req: &GenerateRequest) -> Result<()> {
    let mut prefill = None;
    profile::enable(true);
    let s = generate(model, req, |_| {
        if prefill.is_none() {
            prefill = Some(profile::totals());
            profile::reset();
        }
        Ok(())
    });
    profile::enable(false);
    let s = s?;
    let table = |totals: Vec<profile::Stage>, steps: f64, step_ms: f64| {
        for st in totals {
            let (ms, serial) = (st.total.as_secs_f64() * 1e3 / steps, st.serial.as_secs_f64() * 1e3 / steps);
            println!(
                "  {:<48} {ms:8.3} ms {:6.1} % {serial:8.3} ms {:6.1}",
                st.name,
                100.0 * ms / step_ms,
                st.calls as f64 / steps
            );
        }
    };
    let prefill_ms = s.prefill.as_secs_f64() * 1e3;
    println!(
        "prefill profile: {prefill_ms:.3} ms for {} tokens (stage: ms, share of the step, serial ms (outside parallel loops: the other threads wait), calls)",
        req.prompt.len()
    );
    table(prefill.unwrap_or_default(), 1.0, prefill_ms);
    let steps = s.decode_steps.max(1) as f64;
    let step_ms = s.decode.as_secs_f64() * 1e3 / steps;
    println!(
        "decode profile: {step_ms:.3} ms per step over {} steps (stage: ms per step, share of the step, serial ms per step, calls per step)",
        s.decode_steps
    );
    table(profile::totals(), steps, step_ms);
    profile::reset();
    Ok(())
}

/// Speculative decode of the same greedy request, and the cost of its steps.
fn bench_speculative(
    model: &ModelGroup,
    base: &GenerateRequest,
    k: usize,
    runs: usize,
    plain_tg: f64,
    plain_ids: &[u32],
) -> Result<()> {
    let req = GenerateRequest { num_draft_tokens: k, ..base.clone() };
    let (mut tps, mut ids, mut stats) = (Vec::new(), Vec::new(), None);
    for _ in 0..runs {
        ids.clear();
        let s = generate(model, &req, |t| {
            ids.push(t);
            Ok(())
        })?;
        tps.push((s.generated - 1) as f64 / s.decode.as_secs_f64());
        stats = Some(s);
    }
    let tg = median(tps.clone());
    let s = stats.ok_or_else(|| anyhow::anyhow!("no speculative run"))?;
    let sp = s.speculative.unwrap_or_default();
    println!(
        "decode with MTP K={k}: {tg:.2} tok/s ({:.2}x plain decode)   runs: {:?}; output identical to plain greedy: {}",
        tg / plain_tg.max(1e-9),
        tps.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(),
        if ids == plain_ids { "yes" } else { "NO" }
    );
    println!(
        "  {} verify steps for {} tokens: mean accepted length {:.2}, acceptance rate {:.3}, per position {:?}",
        sp.steps,
        s.generated - 1,
        sp.mean_accepted_length(),
        sp.acceptance_rate(),
        sp.acceptance_rate_per_position().iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>()
    );
    let (one, verify, draft) = step_costs(model, &base.prompt, k, 5 * runs)?;
    println!(
        "  step cost at context {}: 1-token decode {:.2} ms, verify of {} tokens {:.2} ms ({:.2}x), one MTP draft row {:.2} ms ({:.2}x); break-even mean accepted length {:.2}",
        base.prompt.len(),
        one * 1e3,
        k + 1,
        verify * 1e3,
        verify / one,
        draft * 1e3,
        draft / one,
        (verify + k as f64 * draft) / one
    );
    Ok(())
}

/// Median seconds of a 1-token main step, a (k+1)-token main step and a 1-row MTP step, each
/// after `prompt` and rolled back after every timing.
fn step_costs(model: &ModelGroup, prompt: &[u32], k: usize, reps: usize) -> Result<(f64, f64, f64)> {
    let mtp = model.lead().mtp().ok_or_else(|| anyhow::anyhow!("the model has no MTP layer"))?;
    let mut cache = model.lead().new_cache();
    let hidden = model.forward(&ForwardBatch::single(prompt, 0), &mut [&mut cache])?;
    let mut draft_cache = Mtp::new_cache(model.lead());
    let n = prompt.len();
    let mut shifted = prompt[1..].to_vec();
    shifted.push(prompt[n - 1]);
    model.mtp_forward(&ForwardBatch::single(&shifted, 0), &hidden, &mut [&mut draft_cache])?;
    let last = hidden.narrow(0, n - 1, 1)?;
    let tokens: Vec<u32> = (0..=k).map(|i| prompt[(i * 7 + 1) % n]).collect();
    let (mut one, mut verify, mut draft) = (Vec::new(), Vec::new(), Vec::new());
    let time = |f: &mut dyn FnMut() -> Result<Tensor>| -> Result<f64> {
        let t = Instant::now();
        std::hint::black_box(f()?);
        Ok(t.elapsed().as_secs_f64())
    };
    for _ in 0..reps.max(1) {
        one.push(time(&mut || {
            let h = model.forward(&ForwardBatch::single(&tokens[..1], n), &mut [&mut cache])?;
            Ok(model.logits(&h)?)
        })?);
        cache.set_seq_len(n)?;
        verify.push(time(&mut || {
            let h = model.forward(&ForwardBatch::single(&tokens, n), &mut [&mut cache])?;
            Ok(model.logits(&h)?)
        })?);
        cache.set_seq_len(n)?;
        draft.push(time(&mut || {
            let y = model.mtp_forward(&ForwardBatch::single(&tokens[..1], n), &last, &mut [&mut draft_cache])?;
            Ok(model.mtp_head_logits(&mtp.norm(&y)?)?)
        })?);
        draft_cache.set_seq_len(n)?;
    }
    Ok((median(one), median(verify), median(draft)))
}

fn random_prompt(cfg: &DeepSeekConfig, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vocab = cfg.vocab_size.min(128_000) as u32;
    std::iter::once(cfg.bos_token_id.unwrap_or(0)).chain((1..len.max(1)).map(|_| rng.gen_range(2..vocab))).collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Concurrency levels through the batching engine; `single` is the single-stream decode tok/s.
/// `bench --ab`'s line: each variant's mean step time and their ratio.
fn ab_line(what: &str, r: &moeserve_core::ab::Report) -> String {
    format!(
        "{what}: variant A {:.1} us/step ({} steps), variant B {:.1} us/step ({} steps), B/A {:.4}",
        r.a.as_secs_f64() * 1e6,
        r.a_steps,
        r.b.as_secs_f64() * 1e6,
        r.b_steps,
        r.ratio()
    )
}

fn bench_concurrency(model: ModelGroup, args: &Args, single: f64) -> Result<()> {
    let max_c = args.concurrency.iter().copied().max().unwrap_or(1).max(1);
    // the MTP layer (when loaded) has its rows in the same pages; drafts need K slots more
    let lead = model.lead();
    let mut layout = lead.kv_layout();
    layout.num_layers += usize::from(lead.mtp().is_some());
    let per_token = layout.bytes_per_token(lead.dtype().size_in_bytes());
    let tokens = max_c * (args.prompt_len + args.gen_len + 16 + args.engine.spec.draft_tokens());
    let cfg = lead.cfg.clone();
    let mut engine_cfg = args.engine.config()?;
    engine_cfg.kv_cache_bytes = engine_cfg.kv_cache_bytes.min(tokens * per_token);
    engine_cfg.max_waiting = engine_cfg.max_waiting.max(max_c);
    println!(
        "engine: {:.1} MB latent KV cache, {} tokens per step, {} running at most",
        engine_cfg.kv_cache_bytes as f64 / 1e6,
        engine_cfg.max_batch_tokens,
        engine_cfg.max_running
    );
    let spec_k = engine_cfg.num_draft_tokens;
    let engine = Engine::start(model, None, engine_cfg)?;
    for (level, &c) in args.concurrency.iter().enumerate() {
        let c = c.max(1);
        moeserve_core::ab::enable(args.ab);
        let start = Instant::now();
        let handles: Vec<_> = (0..c)
            .map(|i| {
                let req = Request {
                    sampling: SamplingParams::greedy(),
                    ignore_eos: true,
                    ..Request::new(random_prompt(&cfg, args.prompt_len, 1000 * level as u64 + i as u64), args.gen_len)
                };
                engine.submit(req)
            })
            .collect::<Result<_, _>>()?;
        // each request's token times
        let results: Vec<Vec<f64>> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .map(|mut stream| {
                    s.spawn(move || {
                        let mut times = Vec::new();
                        while let Some(ev) = stream.blocking_next() {
                            if let Event::Token { .. } = ev {
                                times.push(start.elapsed().as_secs_f64());
                            }
                        }
                        times
                    })
                })
                .collect();
            joins.into_iter().filter_map(|j| j.join().ok()).collect()
        });
        let wall = start.elapsed().as_secs_f64();
        let mut ttft: Vec<f64> = results.iter().filter_map(|t| t.first().copied()).collect();
        ttft.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        // decode phase: from the last first token to the last token, every request decoding (as
        // llama-batched-bench's generation phase, after all the prompts): the tokens after it
        let all_decoding = ttft.last().copied().unwrap_or(0.0);
        let last = results.iter().filter_map(|t| t.last().copied()).fold(0.0, f64::max);
        let decode_tokens = results.iter().flatten().filter(|&&t| t > all_decoding).count();
        let decode_span = last - all_decoding;
        let agg = decode_tokens as f64 / decode_span.max(1e-9);
        println!(
            "concurrency {c:>3}: aggregate decode {agg:8.2} tok/s ({:.1}x single stream), output {:.2} tok/s over {wall:.1} s, TTFT p50 {:.3} s p99 {:.3} s",
            agg / single.max(1e-9),
            results.iter().map(Vec::len).sum::<usize>() as f64 / wall,
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.99)
        );
        moeserve_core::ab::enable(false);
        if let Some(r) = moeserve_core::ab::report().filter(|_| args.ab) {
            println!("{}", ab_line(&format!("concurrency {c:>3}: A/B (alternate decode-only engine steps)"), &r));
        }
    }
    let m = engine.metrics();
    println!(
        "engine metrics: {} steps, {} preemptions, busy {:.1} s, {:.1} generated tok/s while busy",
        m.steps,
        m.preemptions,
        m.busy_seconds,
        m.generation_tokens_per_second()
    );
    if spec_k > 0 {
        let sp = &m.speculative;
        println!(
            "engine speculative (K={spec_k}): {} verify steps, mean accepted length {:.2}, acceptance per position {:?}",
            sp.steps,
            sp.mean_accepted_length(),
            sp.acceptance_rate_per_position().iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn absorption_shapes_parse() {
        assert_eq!(super::parse_absorption_shape("16x64x64x256"), Ok((16, 64, 64, 256)));
        assert_eq!(super::parse_absorption_shape("0"), Ok((0, 0, 0, 0)));
        assert!(super::parse_absorption_shape("16x64x256").is_err());
        assert!(super::parse_absorption_shape("16x0x64x256").is_err());
        assert!(super::parse_absorption_shape("axbxcxd").is_err());
    }
}
