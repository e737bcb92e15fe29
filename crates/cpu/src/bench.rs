//! The kernel benchmark behind `moeserve bench --kernels`: per format and batch size, the weight
//! bytes read per second against the streaming-read bandwidth measured in the same run.

use std::time::Instant;

use crate::bandwidth::{probe_buffer, read_bandwidth, read_bandwidth_of};
use crate::format::{Format, PackedMatrix};
use crate::matmul::{activations, matmul_many_with, Backend, Product};

pub struct KernelRow {
    pub format: &'static str,
    pub batch: usize,
    pub seconds: f64,
    /// Weight bytes per second.
    pub bytes_per_s: f64,
    /// Time relative to batch 1 of the same format.
    pub vs_batch1: f64,
    /// Read bandwidth probed right after this row (bytes/s): this machine class switches
    /// between bandwidth states for seconds at a time, so a probe at the start of the run can
    /// belong to another state than the row.
    pub read_bandwidth: f64,
}

/// Bytes of the probe after each row (8× the largest last-level cache here; one pass of each
/// stream count, twice: ~40 ms).
const ROW_PROBE_BYTES: usize = 256 << 20;

pub struct KernelReport {
    pub rows: usize,
    pub cols: usize,
    pub read_bandwidth: f64,
    pub results: Vec<KernelRow>,
}

/// Pseudo-random weights without pulling a generator into the library.
fn weights(n: usize) -> Vec<f32> {
    let mut s = 0x9e3779b97f4a7c15u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Each product streams one of enough copies of the matrix to total `min_bytes`, so that no
/// measurement is served from the last-level cache.
pub fn run(
    formats: &[Format],
    batches: &[usize],
    rows: usize,
    cols: usize,
    reps: usize,
    min_bytes: usize,
    backend: Backend,
) -> KernelReport {
    let read = read_bandwidth(1 << 30, 5);
    let probe = probe_buffer(ROW_PROBE_BYTES);
    let w32 = weights(rows * cols);
    let mut results = Vec::new();
    for &format in formats {
        let w = match format {
            Format::Fp8 { block } => {
                let bytes: Vec<u8> = w32.iter().map(|v| ((v * 255.0) as i32 as u8) & 0xf7).collect();
                let scales = vec![0.01f32; rows.div_ceil(block[0]) * cols.div_ceil(block[1])];
                PackedMatrix::from_fp8(rows, cols, &bytes, &scales, block)
            }
            _ => PackedMatrix::from_f32(format, rows, cols, &w32),
        };
        let Ok(w) = w else { continue };
        // enough copies to stream well past the last-level cache (some CPUs have hundreds of MB)
        let copies = (min_bytes / w.resident_bytes().max(1)).max(1);
        let ws: Vec<PackedMatrix> = (0..copies).map(|_| w.clone()).collect();
        // bf16 and FP8 weights twice: with f32 activations, and with activations that are bf16
        // values (a `--dtype bf16` model's), which take the `vdpbf16ps` kernels where the CPU has
        // them; q6_K twice too: in this CPU's layout and in the other (`with_q6k_layout`)
        let bf16_values: Vec<f32>;
        let other: Vec<PackedMatrix>;
        let passes: Vec<(&'static str, &[f32], &[PackedMatrix])> = match format {
            Format::Bf16 | Format::Fp8 { .. } => {
                bf16_values = w32.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
                let exact = if format == Format::Bf16 { "bf16·bf16" } else { "fp8·bf16" };
                vec![(format.name(), &w32, &ws), (exact, &bf16_values, &ws)]
            }
            Format::Q6K => {
                let grouped = w.is_grouped();
                other = ws.iter().map(|w| w.with_q6k_layout(!grouped)).collect();
                let name = if grouped { "q6k·rows" } else { "q6k·groups" };
                vec![(format.name(), &w32, &ws), (name, &w32, &other)]
            }
            _ => vec![(format.name(), &w32, &ws)],
        };
        for &(name, values, ws) in &passes {
            let mut base = None;
            for &batch in batches {
                let x = &values[..batch * cols];
                let mut y = vec![0f32; batch * rows];
                // (on the pool as a model step runs, its threads awake between products)
                let best = crate::on_pool(|| {
                    let mut best = f64::INFINITY;
                    for i in 0..reps.max(1) * copies {
                        let w = &ws[i % copies];
                        let t = Instant::now();
                        let a = activations(w, x, batch);
                        matmul_many_with(backend, &mut [Product { w, x: &a, y: &mut y }]);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    best
                });
                let b1 = *base.get_or_insert(best);
                results.push(KernelRow {
                    format: name,
                    batch,
                    seconds: best,
                    bytes_per_s: w.resident_bytes() as f64 / best,
                    vs_batch1: best / b1,
                    read_bandwidth: crate::on_pool(|| read_bandwidth_of(&probe, 2)),
                });
            }
        }
    }
    KernelReport { rows, cols, read_bandwidth: read, results }
}

/// One decode attention measurement of [`run_attention`].
pub struct AttentionRow {
    /// Whether the cache is bf16 (else f32).
    pub bf16: bool,
    /// Cached rows.
    pub tokens: usize,
    /// Query rows per head (1: a decode step; 2: an MTP verification step).
    pub queries: usize,
    pub seconds: f64,
    /// Cache bytes per second (each cached row is read as key and value).
    pub bytes_per_s: f64,
    /// Multiply-adds per second (scores and weighted sums, every head).
    pub fma_per_s: f64,
}

/// DeepSeek-R1's decode attention (absorbed MLA: `heads` heads over one f32 cache of
/// `latent + rope` values per row), best of `reps` calls per context length and query count; then
/// over the same rows as a bf16 cache, as the engine runs one (its `vdpbf16ps` kernel where the CPU
/// has one, else the rows read as f32 for the f32 kernel).
pub fn run_attention(
    contexts: &[usize],
    queries: &[usize],
    (heads, latent, rope): (usize, usize, usize),
    reps: usize,
    backend: Backend,
) -> Vec<AttentionRow> {
    let row = latent + rope;
    let mut out = Vec::new();
    let most = contexts.iter().copied().max().unwrap_or(0) + queries.iter().copied().max().unwrap_or(1);
    let entries = weights(most * row);
    let q_max = queries.iter().copied().max().unwrap_or(1);
    let q_lat = weights(heads * q_max * latent);
    let q_pe = weights(heads * q_max * rope);
    let bf16_bits: Vec<u16> = entries.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    for bf16 in [false, true] {
        for &tokens in contexts {
            for &s in queries {
                let shape = crate::MlaShape { heads, queries: s, tokens: tokens + s, latent, rope, start: tokens };
                let (ql, qp) = (&q_lat[..heads * s * latent], &q_pe[..heads * s * rope]);
                let n = (tokens + s) * row;
                // (on the pool as a model step runs, its threads awake between calls)
                let best = crate::on_pool(|| {
                    let mut best = f64::INFINITY;
                    for _ in 0..reps.max(1) {
                        let t = Instant::now();
                        let o = if bf16 {
                            crate::mla_decode_bf16(ql, qp, &bf16_bits[..n], None, shape, 0.1).unwrap_or_else(|| {
                                let rows: Vec<f32> = bf16_bits[..n].iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
                                crate::mla_attention_with(backend, ql, qp, &rows, None, shape, 0.1)
                            })
                        } else {
                            crate::mla_attention_with(backend, ql, qp, &entries[..n], None, shape, 0.1)
                        };
                        best = best.min(t.elapsed().as_secs_f64());
                        std::hint::black_box(o);
                    }
                    best
                });
                let fma = (heads * s * (tokens + s) * (row + latent)) as f64;
                out.push(AttentionRow {
                    bf16,
                    tokens,
                    queries: s,
                    seconds: best,
                    bytes_per_s: (n * if bf16 { 2 } else { 4 }) as f64 / best,
                    fma_per_s: fma / best,
                });
            }
        }
    }
    out
}

/// One format of [`run_absorption`].
pub struct AbsorptionRow {
    pub format: &'static str,
    /// One layer's absorption and expansion (one query row per head).
    pub seconds: f64,
    /// Weight bytes the two products read, per second.
    pub bytes_per_s: f64,
    /// Read bandwidth probed right after (as [`KernelRow::read_bandwidth`]).
    pub read_bandwidth: f64,
}

/// A decode step's MLA absorption products for one layer (`absorb_queries` then `expand_values`,
/// one query per head) over kv_b of `(heads, nope, v, latent)`: bf16 rows (a bf16 checkpoint's),
/// FP8 rows with 128 × 128 blocks (an FP8 checkpoint's) and q8_0 with transposed keys (a
/// quantized model's), best of `reps` passes over enough copies (a model's layers) to total
/// `min_bytes`.
pub fn run_absorption(
    (heads, nope, v, latent): (usize, usize, usize, usize),
    reps: usize,
    min_bytes: usize,
    backend: Backend,
) -> Vec<AbsorptionRow> {
    use crate::absorb::{absorb_queries_with, expand_values_with, Kvb, KvbShape};
    let shape = KvbShape { heads, nope, v };
    let rows = heads * (nope + v);
    let w32 = weights(rows * latent);
    let fp8 = || {
        let bytes: Vec<u8> = w32.iter().map(|v| ((v * 255.0) as i32 as u8) & 0xf7).collect();
        let scales = vec![0.01f32; rows.div_ceil(128) * latent.div_ceil(128)];
        PackedMatrix::from_fp8(rows, latent, &bytes, &scales, [128, 128])
    };
    let kvbs: [(&'static str, Result<Kvb, crate::Error>); 3] = [
        ("bf16", PackedMatrix::from_f32(Format::Bf16, rows, latent, &w32).and_then(|kv| Kvb::as_stored(kv, shape))),
        ("fp8", fp8().and_then(|kv| Kvb::as_stored(kv, shape))),
        ("q8_0", Kvb::quantized(&w32, shape, latent)),
    ];
    let probe = probe_buffer(ROW_PROBE_BYTES);
    let q_nope = weights(heads * nope);
    let o_lat = weights(heads * latent);
    let mut out = Vec::new();
    for (format, kvb) in kvbs {
        let Ok(kvb) = kvb else { continue };
        let copies = (min_bytes / kvb.decode_bytes().max(1)).max(1);
        let all: Vec<Kvb> = (0..copies).map(|_| kvb.clone()).collect();
        let best = crate::on_pool(|| {
            let mut best = f64::INFINITY;
            for i in 0..reps.max(1) * copies {
                let kvb = &all[i % copies];
                let t = Instant::now();
                std::hint::black_box(absorb_queries_with(backend, kvb, &q_nope, 1));
                std::hint::black_box(expand_values_with(backend, kvb, &o_lat, 1));
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        });
        let read_bandwidth = crate::on_pool(|| read_bandwidth_of(&probe, 2));
        out.push(AbsorptionRow { format, seconds: best, bytes_per_s: kvb.decode_bytes() as f64 / best, read_bandwidth });
    }
    out
}

#[cfg(test)]
mod tests {
    /// The absorption table: one row per kv_b format, each a real measurement.
    #[test]
    fn absorption_rows_measure_every_format() {
        let rows = super::run_absorption((4, 16, 16, 128), 2, 1 << 20, crate::backend());
        let formats: Vec<&str> = rows.iter().map(|r| r.format).collect();
        assert_eq!(formats, ["bf16", "fp8", "q8_0"]);
        for r in &rows {
            assert!(r.seconds > 0.0 && r.seconds.is_finite(), "{}: {} s", r.format, r.seconds);
            assert!(r.bytes_per_s > 0.0 && r.read_bandwidth > 0.0, "{}", r.format);
        }
    }
}
