//! Every kernel against the plain reference, on ragged shapes (columns that are not a multiple of
//! the block or vector width, row counts that do not split evenly, batches of 1..32).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use moeserve_cpu::{activations, matmul_many_with, matmul_reference, Backend, Format, PackedMatrix, Product};
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// E4M3FN decoded by its definition.
fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((b >> 3) & 15) as i32, (b & 7) as f32);
    if e == 0 {
        sign * m / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

fn pack(format: Format, rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> PackedMatrix {
    match format {
        Format::Fp8 { block } => {
            // finite E4M3 bytes (0x7f / 0xff are NaN)
            let w: Vec<u8> =
                (0..rows * cols).map(|_| rng.gen_range(0..=254u8)).map(|b| if b == 0x7f { 0x7e } else { b }).collect();
            let s: Vec<f32> =
                (0..rows.div_ceil(block[0]) * cols.div_ceil(block[1])).map(|_| rng.gen_range(0.001f32..0.01)).collect();
            PackedMatrix::from_fp8(rows, cols, &w, &s, block).unwrap()
        }
        _ => PackedMatrix::from_f32(format, rows, cols, &rand_vec(rng, rows * cols)).unwrap(),
    }
}

/// `w` in each of its layouts: q6_K's groups of 16 rows and ggml's rows (the CPU's default is
/// one of them, see `PackedMatrix::with_q6k_layout`), any other format as it is.
fn layouts(w: PackedMatrix) -> Vec<PackedMatrix> {
    if w.format() == Format::Q6K {
        vec![w.with_q6k_layout(true), w.with_q6k_layout(false)]
    } else {
        vec![w]
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}

/// Σ_k |W[r, k] x[b, k]| per output: the scale an error of a dot product is judged against
/// (a relative error of one small dot product of cancelling terms says nothing).
fn magnitudes(w: &PackedMatrix, x: &[f32], batch: usize) -> Vec<f32> {
    let cols = w.cols();
    let mut m = vec![0f32; batch * w.rows()];
    for r in 0..w.rows() {
        let wr = w.dequantize_row(r);
        for b in 0..batch {
            m[b * w.rows() + r] = x[b * cols..(b + 1) * cols].iter().zip(&wr).map(|(x, w)| (x * w).abs()).sum();
        }
    }
    m
}

fn scaled_err(got: &[f32], want: &[f32], scale: &[f32]) -> f32 {
    let num: f64 = got.iter().zip(want).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = scale.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}

const FORMATS: [(Format, f32); 8] = [
    (Format::F32, 1e-5),
    (Format::Bf16, 1e-5),
    (Format::Fp8 { block: [128, 128] }, 1e-5),
    (Format::Fp8 { block: [32, 16] }, 1e-5),
    (Format::Fp8 { block: [1, 24] }, 1e-5),
    // 8-bit activations: the reference multiplies unquantized activations
    (Format::Q8_0, 5e-3),
    (Format::Q4K, 5e-3),
    (Format::Q6K, 5e-3),
];

/// `w · x` on every backend against the reference, within `tol` of the products' magnitudes.
fn check_backends(w: &PackedMatrix, x: &[f32], batch: usize, tol: f32, what: &str) {
    let (rows, cols) = (w.rows(), w.cols());
    let mut want = vec![0f32; batch * rows];
    matmul_reference(w, x, batch, &mut want);
    let scale = magnitudes(w, x, batch);
    for backend in [Backend::Amx, Backend::Avx512, Backend::Avx2, Backend::Portable] {
        let a = activations(w, x, batch);
        let mut got = vec![f32::NAN; batch * rows];
        matmul_many_with(backend, &mut [Product { w, x: &a, y: &mut got }]);
        let e = scaled_err(&got, &want, &scale);
        assert!(e < tol, "{what} {backend:?} [{rows}, {cols}] batch {batch}: relative error {e}");
    }
}

#[test]
fn kernels_match_the_reference_on_ragged_shapes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (format, tol) in FORMATS {
        for (rows, cols) in [(1, 32), (7, 100), (33, 273), (130, 1000), (64, 2048)] {
            // (q6_K's rows take the f32 panels of AVX2 from 128 activation rows, the tiles of
            // AVX-512; its groups and the other grouped formats their tiles at every batch size)
            let big: &[usize] = if format == Format::Q6K { &[70, 130] } else { &[70] };
            for w in layouts(pack(format, &mut rng, rows, cols)) {
                for &batch in [1, 2, 3, 4, 5, 8, 13, 16, 32].iter().chain(big) {
                    let x = rand_vec(&mut rng, batch * cols);
                    check_backends(&w, &x, batch, tol, &format!("{format:?} grouped {}", w.is_grouped()));
                }
            }
        }
    }
}

#[test]
fn bf16_and_fp8_weights_with_bf16_activations_match_the_reference() {
    // activations that are bf16 values (a `--dtype bf16` model's) take the `vdpbf16ps` kernels
    // where the CPU has them (FP8 with whole 64-column steps: 128-wide scale blocks): exact
    // products, f32 sums, so f32's bound holds
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for format in [Format::Bf16, Format::Fp8 { block: [128, 128] }, Format::Fp8 { block: [16, 64] }] {
        for (rows, cols) in [(1, 32), (7, 100), (33, 273), (130, 1000), (64, 2048), (5, 64), (131, 576), (300, 1024)] {
            let w = pack(format, &mut rng, rows, cols);
            for batch in [1, 2, 3, 4, 5, 8, 13, 16, 32, 70] {
                let x: Vec<f32> = rand_vec(&mut rng, batch * cols).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
                check_backends(&w, &x, batch, 1e-5, &format!("{format:?} x bf16"));
            }
        }
    }
}

/// Lossless speculative decoding also needs a product's row to have the same bits in a batch
/// (an MTP verification step's 2-5 tokens) as alone (the plain decode step): for every format,
/// with f32 activations and with activations that are bf16 values (which take the `vdpbf16ps`
/// kernels where the CPU has them, at any batch size for that reason). Not on AMX: its bf16
/// tiles take 2 rows and more.
#[test]
fn a_row_has_the_same_bits_in_a_small_batch_as_alone() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let batches = [2, 3, 4, 5, 8, 13];
    for (format, _) in FORMATS {
        for (rows, cols) in [(33, 273), (130, 1024)] {
            for w in layouts(pack(format, &mut rng, rows, cols)) {
                for bf16 in [false, true] {
                    let mut x = rand_vec(&mut rng, 13 * cols);
                    if bf16 {
                        x.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
                    }
                    for backend in [Backend::Avx512, Backend::Avx2, Backend::Portable] {
                        let run = |x: &[f32], batch: usize| {
                            let a = activations(&w, x, batch);
                            let mut y = vec![f32::NAN; batch * rows];
                            matmul_many_with(backend, &mut [Product { w: &w, x: &a, y: &mut y }]);
                            y
                        };
                        let alone: Vec<Vec<f32>> = (0..13).map(|b| run(&x[b * cols..(b + 1) * cols], 1)).collect();
                        for batch in batches {
                            let y = run(&x[..batch * cols], batch);
                            for (b, want) in alone.iter().take(batch).enumerate() {
                                let got = &y[b * rows..(b + 1) * rows];
                                assert!(
                                got.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits()),
                                "{format:?} (grouped {}) bf16 activations {bf16} {backend:?} [{rows}, {cols}]: row {b} of {batch}",
                                w.is_grouped()
                            );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn grouped_formats_in_several_streams_match_the_reference() {
    // q8_0, q4_K and (on AVX-512) q6_K are stored in groups of 16 rows: enough rows that a
    // thread's unit of work holds four or more groups (the kernels then read four groups side by
    // side), the last group ragged; batches on both sides of the AMX thresholds (q6_K 12, q4_K 32,
    // q8_0 48 rows)
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let (rows, cols) = (1000, 2048);
    for format in [Format::Q8_0, Format::Q4K, Format::Q6K] {
        let w = pack(format, &mut rng, rows, cols).with_q6k_layout(true);
        for batch in [1, 2, 3, 5, 8, 12, 31, 49] {
            let x = rand_vec(&mut rng, batch * cols);
            let mut want = vec![0f32; batch * rows];
            matmul_reference(&w, &x, batch, &mut want);
            let scale = magnitudes(&w, &x, batch);
            for backend in [Backend::Amx, Backend::Avx512, Backend::Avx2] {
                let a = activations(&w, &x, batch);
                let mut got = vec![f32::NAN; batch * rows];
                matmul_many_with(backend, &mut [Product { w: &w, x: &a, y: &mut got }]);
                let e = scaled_err(&got, &want, &scale);
                assert!(e < 5e-3, "{format:?} {backend:?} [{rows}, {cols}] batch {batch}: relative error {e}");
            }
        }
    }
}

#[test]
fn grouped_products_match_separate_ones() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let ws: Vec<PackedMatrix> = (0..5).map(|i| pack(Format::Q4K, &mut rng, 40 + 17 * i, 512)).collect();
    let xs: Vec<Vec<f32>> = (0..5).map(|i| rand_vec(&mut rng, (i + 1) * 512)).collect();
    let acts: Vec<_> = ws.iter().zip(&xs).enumerate().map(|(i, (w, x))| activations(w, x, i + 1)).collect();
    let mut outs: Vec<Vec<f32>> = ws.iter().enumerate().map(|(i, w)| vec![0f32; (i + 1) * w.rows()]).collect();
    let mut products: Vec<Product> =
        ws.iter().zip(&acts).zip(outs.iter_mut()).map(|((w, x), y)| Product { w, x, y: y.as_mut_slice() }).collect();
    moeserve_cpu::matmul_many(&mut products);
    for (i, (w, x)) in ws.iter().zip(&xs).enumerate() {
        let mut want = vec![0f32; (i + 1) * w.rows()];
        moeserve_cpu::matmul(w, x, i + 1, &mut want);
        assert_eq!(outs[i], want, "product {i}");
    }
}

#[test]
fn block_layouts_dequantize_like_ggml() {
    // our reading of the q8_0 / q4_K / q6_K bytes against candle's (ggml's) dequantization
    // (37 rows: they are regrouped into two whole groups of 16 and a padded one)
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (rows, cols) = (37, 512);
    let w = rand_vec(&mut rng, rows * cols);
    for (format, dtype) in [(Format::Q8_0, GgmlDType::Q8_0), (Format::Q4K, GgmlDType::Q4K), (Format::Q6K, GgmlDType::Q6K)] {
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let m = PackedMatrix::from_blocks(format, rows, cols, q.data().unwrap().into_owned()).unwrap();
        let got: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
        assert_eq!(got, want, "{format:?}");
        // q6_K in both layouts (the regrouping is lossless both ways)
        for m in layouts(m) {
            let again: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
            assert_eq!(again, want, "{format:?} grouped {}", m.is_grouped());
            assert_eq!(m.with_q6k_layout(!m.is_grouped()).with_q6k_layout(m.is_grouped()).bytes(), m.bytes());
        }
        // and the quantization error is what the format promises
        let e = rel_err(&got, &w);
        let bound = match format {
            Format::Q8_0 => 0.01,
            Format::Q6K => 0.02,
            _ => 0.1,
        };
        assert!(e < bound, "{format:?} quantization error {e}");
    }
}

#[test]
fn fp8_decodes_exactly() {
    // one row of all 254 finite bytes, scale 1: the f16 trick gives the E4M3 values exactly
    let bytes: Vec<u8> = (0..=255u8).filter(|&b| b & 0x7f != 0x7f).collect();
    let m = PackedMatrix::from_fp8(1, bytes.len(), &bytes, &[1.0; 2], [1, 128]).unwrap();
    let row = m.dequantize_row(0);
    for (i, &b) in bytes.iter().enumerate() {
        assert_eq!(row[i], e4m3(b), "byte {b:#04x}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(PackedMatrix::from_f32(Format::F32, 2, 3, &[0.0; 5]).is_err());
    assert!(PackedMatrix::from_fp8(2, 64, &[0; 128], &[1.0], [1, 12]).is_err());
    assert!(PackedMatrix::from_fp8(2, 64, &[0; 128], &[1.0], [1, 64]).is_err()); // needs 2 scales
    assert!(PackedMatrix::from_blocks(Format::Q4K, 1, 200, vec![0; 144]).is_err());
    assert!(PackedMatrix::from_blocks(Format::Q4K, 1, 256, vec![0; 143]).is_err());
}

/// The fused MLA attention against its f64 definition: ragged heads, queries (causal) and cache
/// lengths, latent widths that are not multiples of the vector width; caches long enough to be
/// split over the threads (the partial softmaxes merged); the rows in a shuffled page pool.
#[test]
fn mla_attention_matches_the_reference() {
    use moeserve_cpu::{mla_attention_reference, mla_attention_with, MlaShape, Pages};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (heads, queries, tokens, latent, rope) in [
        (1, 1, 1, 8, 8),
        (3, 1, 37, 32, 8),
        (4, 3, 20, 19, 5),
        (2, 2, 50, 100, 16),
        (16, 2, 129, 256, 32),
        (3, 1, 70, 512, 64),
        (16, 1, 700, 256, 32),
        (4, 3, 300, 40, 8),
        // (queries up to 4 take the decode kernel, rows in the lanes: the shapes above with 2–3
        // queries check its causal mask) heads not a multiple of 16, split and not split
        (20, 1, 17, 36, 12),
        (40, 1, 300, 256, 32),
        (128, 1, 100, 512, 64),
    ] {
        let shape = MlaShape { heads, queries, tokens, latent, rope, start: tokens - queries };
        let q_lat: Vec<f32> = rand_vec(&mut rng, heads * queries * latent);
        let q_pe: Vec<f32> = rand_vec(&mut rng, heads * queries * rope);
        let entries: Vec<f32> = rand_vec(&mut rng, tokens * (latent + rope));
        let want = mla_attention_reference(&q_lat, &q_pe, &entries, None, shape, 0.3);
        // the same rows in a page pool, pages in reverse order after a spare one: 16-row pages
        // (the AVX-512 loops) and 5-row pages (the portable ones)
        let row = latent + rope;
        let paged: Vec<(Vec<f32>, Vec<u32>, usize)> = [16usize, 5]
            .into_iter()
            .map(|size| {
                let n = tokens.div_ceil(size);
                let ids: Vec<u32> = (0..n as u32).rev().map(|i| i + 1).collect();
                let mut pool = vec![f32::NAN; (n + 1) * size * row];
                for t in 0..tokens {
                    let at = (ids[t / size] as usize * size + t % size) * row;
                    pool[at..at + row].copy_from_slice(&entries[t * row..(t + 1) * row]);
                }
                (pool, ids, size)
            })
            .collect();
        for backend in [Backend::Amx, Backend::Avx512, Backend::Avx2, Backend::Portable] {
            let contiguous = mla_attention_with(backend, &q_lat, &q_pe, &entries, None, shape, 0.3);
            let in_pages = paged.iter().map(|(pool, ids, size)| {
                let pages = Pages { ids, size: *size };
                (*size, mla_attention_with(backend, &q_lat, &q_pe, pool, Some(pages), shape, 0.3))
            });
            for (pages, got) in std::iter::once((0, contiguous)).chain(in_pages) {
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "{backend:?} {shape:?} pages of {pages}: relative error {e}");
            }
        }
    }
}

/// Lossless speculative decoding needs a verification step's queries to get the bits of the
/// plain decode steps of the same tokens: a call of 2 queries over `T + 1` rows against one
/// query over `T` rows and one over `T + 1`, around the decode kernel's chunk and block edges.
#[test]
fn a_verify_steps_queries_have_the_bits_of_plain_decode_steps() {
    use moeserve_cpu::{mla_attention_with, MlaShape};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (latent, rope) = (64, 16);
    // the decode kernel's chunks of 128 rows and spans of 16 chunks, their edges, and thread
    // counts that split the chunks within a span
    let pools: Vec<rayon::ThreadPool> =
        [1, 2, 3, 5].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool")).collect();
    for heads in [16, 20] {
        for tokens in [1, 31, 32, 127, 128, 129, 200, 255, 256, 257, 400, 2047, 2048, 2049, 4097, 6200] {
            let row = latent + rope;
            let entries = rand_vec(&mut rng, (tokens + 1) * row);
            let (q_lat, q_pe) = (rand_vec(&mut rng, heads * 2 * latent), rand_vec(&mut rng, heads * 2 * rope));
            let verify = MlaShape { heads, queries: 2, tokens: tokens + 1, latent, rope, start: tokens - 1 };
            // query s of every head, alone
            let alone = |s: usize| {
                let pick = |v: &[f32], w: usize| -> Vec<f32> {
                    (0..heads).flat_map(|h| v[(2 * h + s) * w..(2 * h + s + 1) * w].to_vec()).collect()
                };
                let shape = MlaShape { heads, queries: 1, tokens: tokens + s, latent, rope, start: tokens - 1 + s };
                (pick(&q_lat, latent), pick(&q_pe, rope), shape)
            };
            for backend in [Backend::Amx, Backend::Avx512, Backend::Avx2, Backend::Portable] {
                let mut first: Option<Vec<f32>> = None;
                for pool in &pools {
                    let threads = pool.current_num_threads();
                    let both = pool.install(|| mla_attention_with(backend, &q_lat, &q_pe, &entries, None, verify, 0.3));
                    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                    // nor do the bits depend on the number of threads
                    let first = first.get_or_insert_with(|| both.clone());
                    assert!(same(first, &both), "{backend:?} heads {heads} tokens {tokens}: {threads} threads");
                    for s in 0..2 {
                        let (ql, qp, shape) = alone(s);
                        let one = pool
                            .install(|| mla_attention_with(backend, &ql, &qp, &entries[..shape.tokens * row], None, shape, 0.3));
                        for h in 0..heads {
                            let got = &both[(2 * h + s) * latent..(2 * h + s + 1) * latent];
                            let want = &one[h * latent..(h + 1) * latent];
                            assert!(
                                same(got, want),
                                "{backend:?} heads {heads} tokens {tokens} query {s} head {h}, {threads} threads"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A bf16 cache's decode kernel (`mla_decode_bf16`) on queries whose values times the scale are
/// bf16 themselves, against the f64 definition over the same rows as f32: the scores are then
/// exact products summed in f32, and the softmax weights keep 16 significant bits (bf16 high and
/// low parts) in the weighted sum. Contiguous and paged caches (bit-identical), 1–4 queries,
/// ragged head counts, lengths across the kernel's blocks and chunks.
#[test]
fn bf16_cache_decode_matches_the_reference() {
    use moeserve_cpu::{mla_attention_reference, mla_decode_bf16, MlaShape, Pages};
    if !bf16_decode_runs() {
        eprintln!("no AVX-512 BF16 here: the bf16 cache's decode kernel does not run");
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let scale = 0.125;
    for (heads, latent, rope) in [(16, 64, 16), (20, 256, 32), (3, 32, 2), (4, 32, 8)] {
        for (tokens, queries) in [(1, 1), (33, 1), (200, 2), (300, 4), (2049, 1), (130, 3)] {
            let row = latent + rope;
            let bits: Vec<u16> = rand_vec(&mut rng, tokens * row).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let entries: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
            let bf16_values = |n: usize, rng: &mut rand::rngs::StdRng| -> Vec<f32> {
                rand_vec(rng, n).iter().map(|&v| half::bf16::from_f32(4.0 * v).to_f32()).collect()
            };
            let (q_lat, q_pe) = (bf16_values(heads * queries * latent, &mut rng), bf16_values(heads * queries * rope, &mut rng));
            let shape = MlaShape { heads, queries, tokens, latent, rope, start: tokens - queries };
            let want = mla_attention_reference(&q_lat, &q_pe, &entries, None, shape, scale);
            // the same rows in pages of 16, in reverse order in the pool
            let pages_n = tokens.div_ceil(16);
            let ids: Vec<u32> = (0..pages_n as u32).rev().collect();
            let mut pool = vec![0u16; pages_n * 16 * row];
            for t in 0..tokens {
                let at = (ids[t / 16] as usize * 16 + t % 16) * row;
                pool[at..at + row].copy_from_slice(&bits[t * row..(t + 1) * row]);
            }
            let pages = Pages { ids: &ids, size: 16 };
            let got = mla_decode_bf16(&q_lat, &q_pe, &bits, None, shape, scale).expect("the kernel runs");
            let paged = mla_decode_bf16(&q_lat, &q_pe, &pool, Some(pages), shape, scale).expect("the kernel runs");
            assert!(got.iter().zip(&paged).all(|(a, b)| a.to_bits() == b.to_bits()), "paged: {shape:?}");
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-5, "{shape:?}: off by {worst}");
        }
    }
}

/// Whether this CPU runs the bf16 cache's decode kernel.
fn bf16_decode_runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(moeserve_cpu::backend(), Backend::Avx512 | Backend::Amx) && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// As `a_verify_steps_queries_have_the_bits_of_plain_decode_steps`, for the bf16 cache's
/// kernel: a 2-query call's queries have the bits of two 1-query calls, whatever the threads.
#[test]
fn bf16_cache_decode_verify_steps_have_the_bits_of_plain_decode_steps() {
    use moeserve_cpu::{mla_decode_bf16, MlaShape};
    if !bf16_decode_runs() {
        eprintln!("no AVX-512 BF16 here: the bf16 cache's decode kernel does not run");
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let (latent, rope) = (64, 16);
    let pools: Vec<rayon::ThreadPool> =
        [1, 2, 3, 5].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool")).collect();
    for heads in [16, 20] {
        for tokens in [1, 31, 32, 33, 127, 128, 129, 2047, 2048, 2049, 4097] {
            let row = latent + rope;
            let bits: Vec<u16> =
                rand_vec(&mut rng, (tokens + 1) * row).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let (q_lat, q_pe) = (rand_vec(&mut rng, heads * 2 * latent), rand_vec(&mut rng, heads * 2 * rope));
            let verify = MlaShape { heads, queries: 2, tokens: tokens + 1, latent, rope, start: tokens - 1 };
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
            let mut first: Option<Vec<f32>> = None;
            for pool in &pools {
                let threads = pool.current_num_threads();
                let both = pool.install(|| mla_decode_bf16(&q_lat, &q_pe, &bits, None, verify, 0.3)).expect("the kernel runs");
                let first = first.get_or_insert_with(|| both.clone());
                assert!(same(first, &both), "heads {heads} tokens {tokens}: {threads} threads");
                for s in 0..2 {
                    let pick = |v: &[f32], w: usize| -> Vec<f32> {
                        (0..heads).flat_map(|h| v[(2 * h + s) * w..(2 * h + s + 1) * w].to_vec()).collect()
                    };
                    let shape = MlaShape { heads, queries: 1, tokens: tokens + s, latent, rope, start: tokens - 1 + s };
                    let (ql, qp) = (pick(&q_lat, latent), pick(&q_pe, rope));
                    let one = pool
                        .install(|| mla_decode_bf16(&ql, &qp, &bits[..shape.tokens * row], None, shape, 0.3))
                        .expect("the kernel runs");
                    for h in 0..heads {
                        let got = &both[(2 * h + s) * latent..(2 * h + s + 1) * latent];
                        assert!(
                            same(got, &one[h * latent..(h + 1) * latent]),
                            "heads {heads} tokens {tokens} query {s} head {h}"
                        );
                    }
                }
            }
        }
    }
}

/// The fused attention on MLA's naive (prefill) layout against its f64 definition: per-head key
/// and value rows interleaved in one `[T, H·(P+V)]` buffer, the rotated key shared by every
/// head and read from the cache rows; ragged widths, causal with and without cached history.
#[test]
fn attention_on_per_head_rows_matches_the_reference() {
    use moeserve_cpu::{attention_reference, attention_with, Attention, Rows};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (heads, queries, start, nope, rope, v, latent) in [
        (1, 1, 0, 8, 4, 8, 16),
        (3, 5, 0, 19, 5, 13, 24),
        (2, 70, 0, 64, 32, 64, 256),
        (4, 33, 40, 16, 8, 24, 32),
        (16, 17, 3, 64, 32, 64, 64),
    ] {
        let tokens = start + queries;
        let (row, kv) = (latent + rope, heads * (nope + v));
        let q_nope: Vec<f32> = rand_vec(&mut rng, heads * queries * nope);
        let q_pe: Vec<f32> = rand_vec(&mut rng, heads * queries * rope);
        let decompressed: Vec<f32> = rand_vec(&mut rng, tokens * kv);
        let entries: Vec<f32> = rand_vec(&mut rng, tokens * row);
        let per_head = |offset, width| Rows { data: &decompressed, offset, stride: kv, head_step: nope + v, width };
        let parts = [
            (&q_nope[..], per_head(0, nope)),
            (&q_pe[..], Rows { data: &entries, offset: latent, stride: row, head_step: 0, width: rope }),
        ];
        let call = Attention { parts: &parts, values: per_head(nope, v), heads, queries, tokens, start, scale: 0.2, pages: None };
        let want = attention_reference(&call);
        for backend in [Backend::Amx, Backend::Avx512, Backend::Avx2, Backend::Portable] {
            let got = attention_with(backend, &call);
            let e = rel_err(&got, &want);
            assert!(e < 1e-5, "{backend:?} {heads}x{queries} from {start}: relative error {e}");
        }
    }
}

/// MLA's absorption products against their f64 definition: ragged latent widths and head
/// shapes, 1-4 query rows, f32, bf16 and FP8 rows (the AVX-512 loops), q8_0 and FP8 with
/// 8-column blocks (the portable path), and a quantized model's q8_0 kv_b with its transposed
/// keys (the q8_0 matrix kernels, per head); and each query row with the bits it gets alone
/// (MTP verification stays lossless).
#[test]
fn absorption_products_match_the_reference() {
    use moeserve_cpu::{absorb_queries_with, absorption_reference, expand_values_with, Kvb, KvbShape};
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for (heads, nope, v, latent, s) in
        [(1, 1, 1, 16, 1), (3, 5, 7, 40, 2), (2, 64, 64, 256, 1), (4, 16, 24, 300, 3), (2, 128, 128, 512, 4)]
    {
        let shape = KvbShape { heads, nope, v };
        let rows = heads * (nope + v);
        let q_nope = rand_vec(&mut rng, heads * s * nope);
        let o_lat = rand_vec(&mut rng, heads * s * latent);
        // each query row alone (an MTP verification step's rows get the bits of plain decode steps)
        let alone = |kvb: &Kvb, backend: Backend| -> (Vec<f32>, Vec<f32>) {
            let (mut q_lat, mut o) = (vec![0f32; heads * s * latent], vec![0f32; heads * s * v]);
            for i in 0..s {
                let pick =
                    |x: &[f32], w: usize| -> Vec<f32> { (0..heads).flat_map(|h| x[(h * s + i) * w..][..w].to_vec()).collect() };
                let (ql, oh) = (
                    absorb_queries_with(backend, kvb, &pick(&q_nope, nope), 1),
                    expand_values_with(backend, kvb, &pick(&o_lat, latent), 1),
                );
                for h in 0..heads {
                    q_lat[(h * s + i) * latent..][..latent].copy_from_slice(&ql[h * latent..][..latent]);
                    o[(h * s + i) * v..][..v].copy_from_slice(&oh[h * v..][..v]);
                }
            }
            (q_lat, o)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let same_alone = |kvb: &Kvb, what: &str| {
            for backend in [Backend::Avx512, Backend::Avx2, Backend::Portable] {
                let (q_lat, o) = alone(kvb, backend);
                assert_eq!(
                    bits(&absorb_queries_with(backend, kvb, &q_nope, s)),
                    bits(&q_lat),
                    "absorb {what} {backend:?} {shape:?} s={s}"
                );
                assert_eq!(
                    bits(&expand_values_with(backend, kvb, &o_lat, s)),
                    bits(&o),
                    "expand {what} {backend:?} {shape:?} s={s}"
                );
            }
        };
        let check = |kvb: &Kvb, what: &str| {
            same_alone(kvb, what);
            let (want_q, want_o) = absorption_reference(kvb, &q_nope, &o_lat, s);
            for backend in [Backend::Amx, Backend::Avx512, Backend::Avx2, Backend::Portable] {
                for (product, got, want) in [
                    ("absorb", absorb_queries_with(backend, kvb, &q_nope, s), &want_q),
                    ("expand", expand_values_with(backend, kvb, &o_lat, s), &want_o),
                ] {
                    let e = rel_err(&got, want);
                    assert!(e < 1e-5, "{product} {what} {backend:?} {shape:?} s={s}: relative error {e}");
                }
            }
        };
        for format in [
            Format::F32,
            Format::Bf16,
            Format::Q8_0,
            Format::Fp8 { block: [128, 128] },
            Format::Fp8 { block: [3, 16] },
            Format::Fp8 { block: [2, 8] },
        ] {
            let kv = Kvb::as_stored(pack(format, &mut rng, rows, latent), shape).unwrap();
            check(&kv, &format!("{format:?}"));
            // what the expansion reads, for prefetching: the value rows (q8_0's groups of 16 rows
            // only where the heads' rows are whole groups, else all of kv)
            let (fetched, all) = (kv.expansion_bytes().iter().map(|b| b.len()).sum::<usize>(), kv.kv().bytes().len());
            let whole_groups = format != Format::Q8_0 || (nope % 16 == 0 && v % 16 == 0);
            assert_eq!(fetched, if whole_groups { all / (nope + v) * v } else { all }, "{format:?} {shape:?}");
            // FP8 rows as stored give the bits of their f32 dequantization (a model keeps kv_b
            // as FP8 for these products instead of dequantizing it)
            // (where both take the same loops: the AVX-512 ones need 16-column blocks)
            if let Format::Fp8 { block } = format {
                let dense: Vec<f32> = (0..rows).flat_map(|r| kv.kv().dequantize_row(r).into_iter().take(latent)).collect();
                let f32_kv = Kvb::as_stored(PackedMatrix::from_f32(Format::F32, rows, latent, &dense).unwrap(), shape).unwrap();
                let backends: &[Backend] =
                    if block[1] % 16 == 0 { &[Backend::Avx512, Backend::Portable] } else { &[Backend::Portable] };
                for &backend in backends {
                    assert_eq!(
                        bits(&absorb_queries_with(backend, &kv, &q_nope, s)),
                        bits(&absorb_queries_with(backend, &f32_kv, &q_nope, s)),
                        "absorb {format:?} {backend:?} {shape:?}"
                    );
                    assert_eq!(
                        bits(&expand_values_with(backend, &kv, &o_lat, s)),
                        bits(&expand_values_with(backend, &f32_kv, &o_lat, s)),
                        "expand {format:?} {backend:?} {shape:?}"
                    );
                }
            }
        }
        // q8_0 weights against the reference's unquantized queries and latent outputs, within
        // the q8_0 products' bound of the products' magnitudes (Σ |w · x|: the reference of
        // the absolute values, whose q8_0 quantization is the absolute of the values')
        let values = rand_vec(&mut rng, rows * latent);
        let quantized = Kvb::quantized(&values, shape, latent).unwrap();
        same_alone(&quantized, "quantized");
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
        let (mag_q, mag_o) =
            absorption_reference(&Kvb::quantized(&abs(&values), shape, latent).unwrap(), &abs(&q_nope), &abs(&o_lat), s);
        let (want_q, want_o) = absorption_reference(&quantized, &q_nope, &o_lat, s);
        for backend in [Backend::Amx, Backend::Avx512, Backend::Avx2, Backend::Portable] {
            for (product, got, want, mag) in [
                ("absorb", absorb_queries_with(backend, &quantized, &q_nope, s), &want_q, &mag_q),
                ("expand", expand_values_with(backend, &quantized, &o_lat, s), &want_o, &mag_o),
            ] {
                let e = scaled_err(&got, want, mag);
                assert!(e < 5e-3, "{product} quantized {backend:?} {shape:?} s={s}: error {e} of the magnitudes");
            }
        }
        assert!(quantized.decode_bytes() < quantized.resident_bytes());
    }
    // a kv_b whose rows do not fit the heads is refused, not a panic
    let shape = KvbShape { heads: 2, nope: 3, v: 4 };
    assert!(Kvb::as_stored(pack(Format::Bf16, &mut rng, 13, 16), shape).is_err());
    assert!(Kvb::quantized(&[0.0; 13 * 16], shape, 16).is_err());
}
