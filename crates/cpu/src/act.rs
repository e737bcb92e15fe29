//! Activations prepared for one format: zero-padded f32 rows, and for the ggml block formats the
//! rows quantized to 8 bits per block (as llama.cpp does), so the kernels use integer dot products.

use crate::format::Format;

/// `batch` rows of `padded_cols` activations in the layout a format's kernel reads.
pub struct Activations {
    pub(crate) batch: usize,
    pub(crate) padded_cols: usize,
    /// `[batch, padded_cols]`, zero padded.
    pub(crate) f32: Vec<f32>,
    /// `[batch, padded_cols]` 8-bit values (block formats only; on a CPU with AMX rows padded
    /// with zeros to a multiple of 16, which its tiles load in groups of 16).
    pub(crate) qs: Vec<i8>,
    /// One scale per activation block: 32 values for q8_0, 256 for the k-quants (padded like
    /// `qs`).
    pub(crate) d: Vec<f32>,
    /// q8_0: `-128 · Σ q` over each 32-value block (padded like `qs`): the q8_0 weights are
    /// stored offset by 128 (unsigned), so each block's integer sum starts from this.
    pub(crate) q8_offset: Vec<i32>,
    /// k-quants: the sum of each 16 quantized values (for q6_K's offset of 32; at most 16 · 127
    /// in magnitude).
    pub(crate) sums16: Vec<i16>,
    /// k-quants: the sum of each 32 quantized values times the block scale (for the q4_K mins;
    /// padded like `qs`).
    pub(crate) scaled_sums32: Vec<f32>,
    /// k-quants: the sums of each 32 quantized values again, as 16-bit pairs, 4 per 256 values:
    /// blocks (0, 2), (1, 3), (4, 6), (5, 7) (the lower in the low half). The AVX-512 q4_K kernel
    /// multiplies them by the mins with `vpdpwssd` (padded like `qs`).
    pub(crate) min_pairs: Vec<i32>,
    pub(crate) block: usize,
    /// FP8 weights with whole 32-column scale blocks, for the AVX2 FP8 kernel only (built on first
    /// use, see [`Self::fp8_order`]).
    fp8_order: Option<std::sync::OnceLock<Vec<f32>>>,
    /// The rows as bf16 high and low parts for the AMX tiles, built on first use (see
    /// [`Self::bf16_pairs`]).
    bf16_pairs: std::sync::OnceLock<Vec<u16>>,
    /// bf16 and FP8 weights only, `[batch, padded_cols]`: the rows as bf16, set when every value
    /// is exactly a bf16 (a `--dtype bf16` model's activations) and the CPU has `vdpbf16ps`,
    /// which then multiplies them exactly with no rounding of its own (see `simd::bf16_512`; for
    /// FP8 weights `simd::fp8_bf16`, which takes each 64 columns in its own order). At any
    /// number of rows, one included: a row then has the same bits in a batch (an MTP
    /// verification step) as alone (a decode step); one row is memory-bound and reads as fast on
    /// these kernels as on the f32 ones.
    pub(crate) bf16_exact: Option<Vec<u16>>,
    /// With `bf16_exact`, the rows for `simd::batch_bf16`, built on first use (see
    /// [`Self::bf16_quads`]).
    bf16_quads: std::sync::OnceLock<Vec<u32>>,
}

impl Activations {
    /// `x: [batch, cols]` row-major for a weight of `format` whose rows are `padded_cols` long.
    pub fn new(format: Format, x: &[f32], batch: usize, cols: usize, padded_cols: usize) -> Self {
        let f = if cols == padded_cols {
            x[..batch * cols].to_vec()
        } else {
            let mut f = vec![0f32; batch * padded_cols];
            for b in 0..batch {
                f[b * padded_cols..b * padded_cols + cols].copy_from_slice(&x[b * cols..(b + 1) * cols]);
            }
            f
        };
        let block = match format {
            Format::Q8_0 => 32,
            Format::Q4K | Format::Q6K => 256,
            _ => 0,
        };
        let fp8_order = match format {
            Format::Fp8 { block } if block[1] % 32 == 0 => Some(std::sync::OnceLock::new()),
            _ => None,
        };
        let mut a = Activations {
            batch,
            padded_cols,
            f32: f,
            qs: Vec::new(),
            d: Vec::new(),
            q8_offset: Vec::new(),
            sums16: Vec::new(),
            scaled_sums32: Vec::new(),
            min_pairs: Vec::new(),
            block,
            fp8_order,
            bf16_pairs: std::sync::OnceLock::new(),
            bf16_exact: None,
            bf16_quads: std::sync::OnceLock::new(),
        };
        if block > 0 {
            a.quantize();
        }
        if format == Format::Bf16 && bf16_dot_available() {
            a.bf16_exact = bf16_exact(&a.f32);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::fp8_bf16::applies(format, padded_cols) && crate::simd::fp8_bf16::available() {
            a.bf16_exact = bf16_exact(&a.f32).map(|x| crate::simd::fp8_bf16::interleave(&x, padded_cols));
        }
        a
    }

    /// Rows `rows` of these activations, in that order, as activations of their own: the values
    /// [`Activations::new`] gives those rows (each row is quantized on its own), copied instead
    /// of computed again. A MoE layer's experts each take some of a step's tokens.
    pub fn gather(&self, rows: &[usize]) -> Activations {
        let pc = self.padded_cols;
        let padded = if self.block > 0 { tile_rows(rows.len()) } else { rows.len() };
        let blocks = pc.checked_div(self.block).unwrap_or(0);
        Activations {
            batch: rows.len(),
            padded_cols: pc,
            f32: gather_rows(&self.f32, rows, pc, rows.len()),
            qs: gather_rows(&self.qs, rows, pc, padded),
            d: gather_rows(&self.d, rows, blocks, padded),
            q8_offset: gather_rows(&self.q8_offset, rows, pc / 32, padded),
            sums16: gather_rows(&self.sums16, rows, pc / 16, padded),
            scaled_sums32: gather_rows(&self.scaled_sums32, rows, pc / 32, padded),
            min_pairs: gather_rows(&self.min_pairs, rows, pc / 64, padded),
            block: self.block,
            fp8_order: self.fp8_order.as_ref().map(|_| std::sync::OnceLock::new()),
            bf16_pairs: std::sync::OnceLock::new(),
            bf16_exact: self.bf16_exact.as_ref().map(|v| gather_rows(v, rows, pc, rows.len())),
            bf16_quads: std::sync::OnceLock::new(),
        }
    }

    /// The rows as bf16 bits (exact: only with `bf16_exact`), in tiles of 8 rows, each
    /// `[padded_cols / 4][16]` 32-bit lanes: lane `2m` holds columns `4q` (low half) and `4q + 1`
    /// of the tile's row `m`, lane `2m + 1` columns `4q + 2` and `4q + 3`. Rows past `batch` in the
    /// last tile are zero.
    pub(crate) fn bf16_quads(&self) -> &[u32] {
        self.bf16_quads.get_or_init(|| {
            let pc = self.padded_cols;
            let tile = 4 * pc;
            let mut out = vec![0u32; self.batch.div_ceil(8) * tile];
            let bits = |v: f32| v.to_bits() >> 16;
            for (b, row) in self.f32.chunks_exact(pc).enumerate() {
                let (t, m) = (b / 8, b % 8);
                for (q, c) in row.chunks_exact(4).enumerate() {
                    let lanes = &mut out[t * tile + 16 * q + 2 * m..][..2];
                    lanes[0] = bits(c[0]) | bits(c[1]) << 16;
                    lanes[1] = bits(c[2]) | bits(c[3]) << 16;
                }
            }
            out
        })
    }

    pub(crate) fn has_fp8_order(&self) -> bool {
        self.fp8_order.is_some()
    }

    /// The f32 rows with each 32 columns reordered as the AVX2 FP8 kernel decodes them (even
    /// columns 0..16, even 16..32, odd 0..16, odd 16..32); empty unless [`Self::has_fp8_order`].
    pub(crate) fn fp8_order(&self) -> &[f32] {
        self.fp8_order.as_ref().map_or(&[], |o| o.get_or_init(|| fp8_order(&self.f32)))
    }

    /// The rows as bf16 for the AMX tiles, in groups of 16 rows: each value `x` as a high part
    /// `h = bf16(x)` and a low part `bf16(x - h)` (nearest even), so `h + l` keeps 16 significant
    /// bits of `x`. A group is its high parts then its low parts, each `[padded_cols / 2][16][2]`:
    /// column pairs of the 16 rows side by side, the order in which a tile takes its right-hand
    /// operand. Rows past `batch` in the last group are zero.
    pub(crate) fn bf16_pairs(&self) -> &[u16] {
        self.bf16_pairs.get_or_init(|| {
            let pc = self.padded_cols;
            let part = pc * 16;
            let mut out = vec![0u16; self.batch.div_ceil(16) * 2 * part];
            #[cfg(target_arch = "x86_64")]
            let wide = crate::simd::avx512::available() && is_x86_feature_detected!("avx512bf16");
            for b in 0..self.batch {
                let (g, n) = (b / 16, b % 16);
                let x = &self.f32[b * pc..(b + 1) * pc];
                let (hi, lo) = out[2 * g * part..2 * (g + 1) * part].split_at_mut(part);
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: AVX-512 F/BW/VL and BF16 checked above; `hi` and `lo` hold
                    // `pc / 2` pairs of 16 rows.
                    done = unsafe { bf16_pairs_avx512(x, n, hi, lo) };
                }
                for (k, &v) in x.iter().enumerate().skip(done) {
                    let i = (k / 2) * 32 + 2 * n + k % 2;
                    (hi[i], lo[i]) = bf16_pair(v);
                }
            }
            out
        })
    }

    fn quantize(&mut self) {
        // the real rows' values, then zero padding rows (whose sums are zero too)
        let (n, block) = (self.f32.len(), self.block);
        let padded = tile_rows(self.batch) * self.padded_cols;
        self.qs = vec![0; padded];
        self.d = vec![0.0; padded / block];
        let mut sums16 = vec![0i16; padded / 16];
        let (qs, d, sums) = (&mut self.qs[..n], &mut self.d[..n / block], &mut sums16[..n / 16]);
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx512::available() {
            // SAFETY: the CPU has AVX-512 (F, BW), checked just above.
            unsafe { quantize_avx512(&self.f32, qs, d, sums, block) };
        } else {
            quantize(&self.f32, qs, d, sums, block);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize(&self.f32, qs, d, sums, block);
        let sums32 = sums16.chunks_exact(2).map(|p| p[0] as i32 + p[1] as i32);
        if block == 256 {
            let s32: Vec<i32> = sums32.collect();
            // (each at most 32 · 128 in magnitude: a 16-bit value)
            let pair = |lo: i32, hi: i32| (lo as u16 as u32 | (hi as u16 as u32) << 16) as i32;
            self.min_pairs = s32
                .chunks_exact(8)
                .flat_map(|s| [pair(s[0], s[2]), pair(s[1], s[3]), pair(s[4], s[6]), pair(s[5], s[7])])
                .collect();
            self.scaled_sums32 = s32.iter().enumerate().map(|(k, &s)| s as f32 * self.d[k / 8]).collect();
            self.sums16 = sums16;
        } else {
            self.q8_offset = sums32.map(|s| -128 * s).collect();
        }
    }
}

/// Rows of a block format's 8-bit activations for `batch` rows: whole groups of 16 where the
/// AMX tiles may read them, else `batch` (the vector kernels read only the real rows, and a
/// decode step's activations then zero no padding: 15 rows of it per product were 10 % of a
/// MoE layer's serial time).
fn tile_rows(batch: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::amx::available() {
        return batch.next_multiple_of(16);
    }
    batch
}

/// Whether this CPU runs the bf16 × bf16 kernel (`simd::bf16_512`).
fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::simd::avx512::available() && is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x`'s high halves, if every value is exactly a bf16 (its low 16 bits zero).
fn bf16_exact(x: &[f32]) -> Option<Vec<u16>> {
    let bits = |v: &f32| v.to_bits();
    if x.iter().any(|v| bits(v) & 0xffff != 0) {
        return None;
    }
    Some(x.iter().map(|v| (bits(v) >> 16) as u16).collect())
}

/// `x` as the bits of a bf16 high part `h = bf16(x)` and a low part `bf16(x - h)`.
fn bf16_pair(x: f32) -> (u16, u16) {
    let h = half::bf16::from_f32(x);
    (h.to_bits(), half::bf16::from_f32(x - h.to_f32()).to_bits())
}

/// Rows `rows` of `per` values each out of `v` (empty stays empty), zero rows up to `padded`.
fn gather_rows<T: Copy + Default>(v: &[T], rows: &[usize], per: usize, padded: usize) -> Vec<T> {
    if v.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(padded * per);
    for &r in rows {
        out.extend_from_slice(&v[r * per..(r + 1) * per]);
    }
    out.resize(padded * per, T::default());
    out
}

/// Each `block` values of `x` to 8 bits: `d = max |x| / 127`, `q = round(x / d)` (nearest, ties
/// to even), and the sum of each 16 `q`. Written so that both loops vectorize: 16 independent
/// maxima, and rounding by adding and subtracting 1.5 · 2^23 (exact for |v| <= 127).
fn quantize(x: &[f32], qs: &mut [i8], d: &mut [f32], sums16: &mut [i16], block: usize) {
    const ROUND: f32 = 12_582_912.0;
    for ((src, dst), d) in x.chunks_exact(block).zip(qs.chunks_exact_mut(block)).zip(d) {
        let mut m = [0f32; 16];
        for c in src.chunks_exact(16) {
            for i in 0..16 {
                m[i] = m[i].max(c[i].abs());
            }
        }
        *d = m.iter().fold(0f32, |a, &b| a.max(b)) / 127.0;
        let inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
        for (q, v) in dst.iter_mut().zip(src) {
            *q = ((v * inv + ROUND) - ROUND) as i8;
        }
    }
    for (s, q) in sums16.iter_mut().zip(qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| v as i16).sum();
    }
}

/// [`quantize`] with AVX-512 (the same values: `vcvtps2dq` rounds to nearest even, and `vpmovsdb`
/// saturates as `as i8` does). The portable loops did not vectorize their maxima (`f32::max`
/// keeps NaN rules) and were a tenth of a prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(x: &[f32], qs: &mut [i8], d: &mut [f32], sums16: &mut [i16], block: usize) {
    use std::arch::x86_64::*;
    for ((src, dst), d) in x.chunks_exact(block).zip(qs.chunks_exact_mut(block)).zip(d) {
        let mut m = _mm512_setzero_ps();
        for c in src.chunks_exact(16) {
            m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr())));
        }
        *d = _mm512_reduce_max_ps(m) / 127.0;
        let inv = _mm512_set1_ps(if *d > 0.0 { 1.0 / *d } else { 0.0 });
        for (c, q) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            let v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv));
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(v));
        }
    }
    // sums of 16: `vpsadbw` adds each 8 bytes (made unsigned by + 128) into a 64-bit lane
    let (flip, zero) = (_mm512_set1_epi8(-128), _mm512_setzero_si512());
    for (q, s) in qs.chunks_exact(64).zip(sums16.chunks_exact_mut(4)) {
        let sad = _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(q.as_ptr() as *const _), flip), zero);
        let mut lanes = [0u64; 8];
        _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, sad);
        for (k, s) in s.iter_mut().enumerate() {
            *s = (lanes[2 * k] + lanes[2 * k + 1]) as i16 - 16 * 128;
        }
    }
    for (s, q) in sums16.iter_mut().zip(qs.chunks_exact(16)).skip(qs.len() / 64 * 4) {
        *s = q.iter().map(|&v| v as i16).sum();
    }
}

/// [`Activations::bf16_pairs`] of row `n` of its group for the columns up to a multiple of 32
/// (returned): 32 columns at a time, rounded to nearest even by `vcvtne2ps2bf16` as
/// `half::bf16::from_f32` rounds (it flushes denormal inputs to zero, which no activation is
/// near), each column pair a 32-bit word scattered to its place among the 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_pairs_avx512(x: &[f32], n: usize, hi: &mut [u16], lo: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let full = x.len() / 32 * 32;
    assert!(hi.len() >= full * 16 && lo.len() >= full * 16);
    // word j of 32 columns (the pair 2j, 2j + 1) goes to word 16 j + n
    let idx = _mm512_add_epi32(
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(16)),
        _mm512_set1_epi32(n as i32),
    );
    let widen = |h: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
    for k0 in (0..full).step_by(32) {
        let (a, b) = (_mm512_loadu_ps(x.as_ptr().add(k0)), _mm512_loadu_ps(x.as_ptr().add(k0 + 16)));
        let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
        let (ha, hb) = (widen(_mm512_castsi512_si256(h)), widen(_mm512_extracti64x4_epi64::<1>(h)));
        let l: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha)));
        let word = k0 / 2 * 16;
        _mm512_i32scatter_epi32::<4>(hi.as_mut_ptr().add(2 * word) as *mut _, idx, h);
        _mm512_i32scatter_epi32::<4>(lo.as_mut_ptr().add(2 * word) as *mut _, idx, l);
    }
    full
}

/// Each 32 values reordered to the FP8 kernel's decode order (see [`Activations::fp8_order`]).
fn fp8_order(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for c in x.chunks_exact(32) {
        for start in [0, 16, 1, 17] {
            out.extend((0..8).map(|i| c[start + 2 * i]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Activations;
    use crate::format::Format;

    /// `n` values in ±0.5 times powers of ten over `decades` decades around 1 (xorshift from `seed`).
    fn random_values(n: usize, seed: u64, decades: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 10f32.powi((s % decades) as i32 - (decades / 2) as i32)
            })
            .collect()
    }

    #[test]
    fn gathered_rows_are_the_rows_prepared_again() {
        let (cols, padded_cols) = (300, 512);
        let x: Vec<f32> = (0..5 * cols).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1 + i % 7) as f32).collect();
        // bf16 twice: values that are not bf16, and values that are (`bf16_exact`)
        let x_bf16: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        for (format, x) in [(Format::Q8_0, &x), (Format::Q4K, &x), (Format::Q6K, &x), (Format::Bf16, &x), (Format::Bf16, &x_bf16)]
        {
            let all = Activations::new(format, x, 5, cols, padded_cols);
            let rows = [3, 0, 3, 4];
            let picked: Vec<f32> = rows.iter().flat_map(|&r| x[r * cols..(r + 1) * cols].to_vec()).collect();
            let want = Activations::new(format, &picked, rows.len(), cols, padded_cols);
            let got = all.gather(&rows);
            assert_eq!((got.batch, got.padded_cols, got.block), (want.batch, want.padded_cols, want.block));
            assert_eq!(got.f32, want.f32, "{format:?}");
            assert_eq!(got.qs, want.qs, "{format:?}");
            assert_eq!(got.d, want.d, "{format:?}");
            assert_eq!(got.q8_offset, want.q8_offset, "{format:?}");
            assert_eq!(got.sums16, want.sums16, "{format:?}");
            assert_eq!(got.scaled_sums32, want.scaled_sums32, "{format:?}");
            assert_eq!(got.min_pairs, want.min_pairs, "{format:?}");
            assert_eq!(got.bf16_exact, want.bf16_exact, "{format:?}");
        }
    }

    #[test]
    fn only_exact_bf16_values_are_kept_as_bf16() {
        let exact = [1.0f32, -0.5, 0.0, half::bf16::from_f32(3.0e-20).to_f32(), half::bf16::from_f32(0.1).to_f32()];
        assert_eq!(super::bf16_exact(&exact), Some(exact.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()));
        assert_eq!(super::bf16_exact(&[1.0, 0.1]), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_bf16_pairs_are_the_portable_ones() {
        if !(crate::simd::avx512::available() && is_x86_feature_detected!("avx512bf16")) {
            return;
        }
        let cols: usize = 100; // three whole 32-column steps and a tail
        let x = random_values(cols, 0x9e3779b97f4a7c15, 9);
        for n in [0, 5, 15] {
            let (mut hi, mut lo) = (vec![0u16; cols.next_multiple_of(2) * 16], vec![0u16; cols.next_multiple_of(2) * 16]);
            let (mut want_hi, mut want_lo) = (hi.clone(), lo.clone());
            // SAFETY: features checked above.
            let done = unsafe { super::bf16_pairs_avx512(&x, n, &mut hi, &mut lo) };
            assert_eq!(done, 96);
            for (k, &v) in x.iter().enumerate().take(done) {
                let i = (k / 2) * 32 + 2 * n + k % 2;
                (want_hi[i], want_lo[i]) = super::bf16_pair(v);
            }
            assert_eq!(hi, want_hi, "row {n}");
            assert_eq!(lo, want_lo, "row {n}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_quantization_is_the_portable_one() {
        if !crate::simd::avx512::available() {
            return;
        }
        let mut x = random_values(256 * 40, 0x2545f4914f6cdd1d, 7);
        // ties, zeros and a zero block
        x[3] = 0.5 * x[0].abs();
        x[256..288].fill(0.0);
        for block in [32, 256] {
            let (mut q1, mut d1, mut s1) = (vec![0i8; x.len()], vec![0f32; x.len() / block], vec![0i16; x.len() / 16]);
            let (mut q2, mut d2, mut s2) = (q1.clone(), d1.clone(), s1.clone());
            super::quantize(&x, &mut q1, &mut d1, &mut s1, block);
            // SAFETY: AVX-512 checked above.
            unsafe { super::quantize_avx512(&x, &mut q2, &mut d2, &mut s2, block) };
            assert_eq!(d1, d2, "block {block}");
            assert_eq!(q1, q2, "block {block}");
            assert_eq!(s1, s2, "block {block}");
            assert!(s1.iter().any(|&s| s != 0));
        }
    }
}
