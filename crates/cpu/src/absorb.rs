//! MLA's per-head absorption products against kv_b, `[H·(P+V), L]` (each head's `P` key rows,
//! then its `V` value rows, `L` latents wide):
//! - [`absorb_queries`]: `q_lat[h, s] = W_UK[h]ᵀ q_nope[h, s]`, a sum of the head's key rows
//!   weighted by the query (no horizontal sums: each row is one multiply-add per 16 latents);
//! - [`expand_values`]: `o[h, s] = W_UV[h] o_lat[h, s]`, 16 value rows at a time, their sums
//!   transposed into one vector.
//!
//! Decode runs both once per layer and head; as matrix products over per-head `[L, P]` and
//! `[V, L]` matrices they were mostly horizontal sums and call overhead. f32, bf16 and FP8 rows
//! take the AVX-512 loops (FP8 as stored, a quarter of the bytes of its f32 dequantization, each
//! weight decoded to the same f32 bits); other formats (and other CPUs) the portable ones.
//!
//! A model whose projections are quantized keeps kv_b as q8_0 instead ([`Kvb::quantized`]),
//! with each head's key rows transposed beside it: both products are then the q8_0 matrix
//! kernels' (int8 dot products against the queries and latent outputs quantized to 8 bits a
//! block, as llama.cpp's `attn_k_b` / `attn_v_b`), reading half the bytes of bf16 rows.

use rayon::prelude::*;

use crate::{Activations, Backend, Error, Format, PackedMatrix};

/// How kv_b's rows divide into heads.
#[derive(Debug, Clone, Copy)]
pub struct KvbShape {
    pub heads: usize,
    /// Key rows per head (`qk_nope_head_dim`).
    pub nope: usize,
    /// Value rows per head (`v_head_dim`).
    pub v: usize,
}

impl KvbShape {
    fn check_rows(&self, kv: &PackedMatrix) -> Result<(), Error> {
        match kv.rows == self.heads * (self.nope + self.v) {
            true => Ok(()),
            false => Err(Error(format!("kv_b has {} rows, {self:?} needs {}", kv.rows, self.heads * (self.nope + self.v)))),
        }
    }

    /// Row of head `h`'s first key row.
    fn head(&self, h: usize) -> usize {
        h * (self.nope + self.v)
    }
}

/// kv_b as the absorbed products read it: as stored ([`Kvb::as_stored`]), or as q8_0 with the
/// key rows transposed beside it ([`Kvb::quantized`]).
#[derive(Debug, Clone)]
pub struct Kvb {
    /// `[H·(P+V), L]`: the expansion's value rows, and prefill's decompression of cache rows.
    kv: PackedMatrix,
    /// q8_0 kv_b only: `[H·L, P]`, head `h`'s `W_UKᵀ` in rows `h·L..(h + 1)·L`, so the absorption
    /// is a matrix × vector product per head too.
    keys_t: Option<PackedMatrix>,
    shape: KvbShape,
}

impl Kvb {
    /// kv_b in the format it is packed in: the AVX-512 loops take f32, bf16 and FP8 with column
    /// blocks of a multiple of 16 ([`takes_as_stored`]), the portable loops any format.
    pub fn as_stored(kv: PackedMatrix, shape: KvbShape) -> Result<Self, Error> {
        shape.check_rows(&kv)?;
        Ok(Kvb { kv, keys_t: None, shape })
    }

    /// `values: [H, P+V, L]` quantized to q8_0, each head's key rows also transposed and
    /// quantized (along `P`): for a model whose projections are quantized anyway (the error of
    /// q8_0 is far below theirs), at half the bytes of bf16 rows per decoded token.
    pub fn quantized(values: &[f32], shape: KvbShape, latent: usize) -> Result<Self, Error> {
        let KvbShape { heads, nope: p, v } = shape;
        let rows = heads * (p + v);
        if values.len() != rows * latent {
            return Err(Error(format!("kv_b has {} values, expected {rows} x {latent}", values.len())));
        }
        let kv = PackedMatrix::from_f32(Format::Q8_0, rows, latent, values)?;
        let mut t = vec![0f32; heads * latent * p];
        for h in 0..heads {
            for r in 0..p {
                let row = &values[(shape.head(h) + r) * latent..][..latent];
                for (c, &w) in row.iter().enumerate() {
                    t[(h * latent + c) * p + r] = w;
                }
            }
        }
        let keys_t = PackedMatrix::from_f32(Format::Q8_0, heads * latent, p, &t)?;
        Ok(Kvb { kv, keys_t: Some(keys_t), shape })
    }

    /// `[H·(P+V), L]`, for the decompression of cache rows into every head's keys and values.
    pub fn kv(&self) -> &PackedMatrix {
        &self.kv
    }

    /// Bytes held (kv, and the transposed keys of a q8_0 kv_b).
    pub fn resident_bytes(&self) -> usize {
        self.kv.resident_bytes() + self.keys_t.as_ref().map_or(0, PackedMatrix::resident_bytes)
    }

    /// The matrix the absorption reads (for [`crate::prefetch::next`]).
    pub fn absorption_weights(&self) -> &PackedMatrix {
        self.keys_t.as_ref().unwrap_or(&self.kv)
    }

    /// The bytes the expansion reads: each head's value rows (for [`crate::prefetch::next_bytes`];
    /// all of kv where a head's rows are not whole groups of the stored layout).
    pub fn expansion_bytes(&self) -> Vec<&[u8]> {
        let KvbShape { heads, nope, v } = self.shape;
        let first = |h: usize| self.shape.head(h) + nope;
        (0..heads)
            .map(|h| self.kv.bytes_of_rows(first(h)..first(h) + v))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_else(|| vec![self.kv.bytes()])
    }

    /// Weight bytes a decode step reads for the two products: all of kv as stored; for q8_0 the
    /// transposed keys and the value rows.
    pub fn decode_bytes(&self) -> usize {
        match &self.keys_t {
            None => self.kv.resident_bytes(),
            Some(t) => t.resident_bytes() + self.kv.resident_bytes() * self.shape.v / (self.shape.nope + self.shape.v).max(1),
        }
    }
}

/// `q_nope: [H, S, P]` -> `q_lat: [H, S, L]`.
pub fn absorb_queries(kvb: &Kvb, q_nope: &[f32], s: usize) -> Vec<f32> {
    absorb_queries_with(crate::backend(), kvb, q_nope, s)
}

/// `o_lat: [H, S, L]` -> `o: [H, S, V]`.
pub fn expand_values(kvb: &Kvb, o_lat: &[f32], s: usize) -> Vec<f32> {
    expand_values_with(crate::backend(), kvb, o_lat, s)
}

/// Whether this CPU's loops take kv_b in `kv`'s format as it is (f32, bf16, and FP8 with
/// column blocks of a multiple of 16 on AVX-512; elsewhere a row at a time, dequantized).
pub fn takes_as_stored(kv: &PackedMatrix) -> bool {
    matches!(kv.format, Format::F32 | Format::Bf16) || wide(crate::backend(), kv)
}

/// Whether `backend` runs the AVX-512 loops for `kv`'s format.
fn wide(backend: Backend, kv: &PackedMatrix) -> bool {
    matches!(backend, Backend::Avx512 | Backend::Amx)
        && crate::matmul::available(backend)
        && match kv.format {
            Format::F32 | Format::Bf16 => true,
            // a vector's 16 columns under one scale
            Format::Fp8 { block } => block[1].is_multiple_of(16),
            _ => false,
        }
}

/// `[H, S, n]`: head `h`'s `w[first(h)..first(h) + n] · x[h, s]` for its `S` rows of
/// `x: [H, S, w.cols]`, by the matrix kernels (the rows quantized once, each on its own as a
/// product's activations are), a head and query row a task.
fn per_head(
    backend: Backend,
    w: &PackedMatrix,
    heads: usize,
    n: usize,
    first: impl Fn(usize) -> usize + Sync,
    x: &[f32],
    s: usize,
) -> Vec<f32> {
    let backend = if crate::matmul::available(backend) { backend } else { Backend::Portable };
    assert_eq!(x.len(), heads * s * w.cols, "per-head activations");
    let a = Activations::new(w.format, x, heads * s, w.cols, w.padded_cols);
    // the kernels write row `r` at `y[r]`: into one `[S, rows]` buffer, each head its own rows
    // of it, then gathered per head
    let mut all = vec![0f32; s * w.rows];
    let y = crate::matmul::OutPtr(all.as_mut_ptr());
    crate::pool::for_each_in_order(heads * s, |i| {
        let (h, q) = (i / s, i % s);
        let r0 = first(h);
        debug_assert!(r0 + n <= w.rows);
        // SAFETY: activation row `i` (`h · S + q`) exists; rows `r0..r0 + n` of `w`, written at
        // `[q, r0..r0 + n]` of `all` (`[s, w.rows]`); the heads' row ranges are disjoint
        unsafe { crate::matmul::rows_of(backend, w, &a, i, r0, r0 + n, y.get().add(q * w.rows)) }
    });
    let mut out = Vec::with_capacity(heads * s * n);
    for h in 0..heads {
        for q in 0..s {
            out.extend_from_slice(&all[q * w.rows + first(h)..][..n]);
        }
    }
    out
}

/// [`absorb_queries`] on a chosen backend (tests compare them).
pub fn absorb_queries_with(backend: Backend, kvb: &Kvb, q_nope: &[f32], s: usize) -> Vec<f32> {
    let (kv, shape) = (&kvb.kv, kvb.shape);
    let (p, l) = (shape.nope, kv.cols);
    assert_eq!(q_nope.len(), shape.heads * s * p, "q_nope");
    if let Some(t) = &kvb.keys_t {
        return per_head(backend, t, shape.heads, l, |h| h * l, q_nope, s);
    }
    let mut out = vec![0f32; shape.heads * s * l];
    if l == 0 || s == 0 {
        return out;
    }
    let wide = wide(backend, kv);
    crate::pool::parallel(|| {
        out.par_chunks_mut(s * l).enumerate().for_each(|(h, y)| {
            let q = &q_nope[h * s * p..(h + 1) * s * p];
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: AVX-512F (`wide`); the head's rows are inside kv (`Kvb::as_stored`
                // checked its rows against the shape).
                unsafe { x86::absorb_head(kv, shape.head(h), p, q, y) };
                return;
            }
            let _ = wide;
            for r in 0..p {
                let row = kv.dequantize_row(shape.head(h) + r);
                for (y, q) in y.chunks_exact_mut(l).zip(q.chunks_exact(p)) {
                    y.iter_mut().zip(&row).for_each(|(y, w)| *y += q[r] * w);
                }
            }
        })
    });
    out
}

/// [`expand_values`] on a chosen backend (tests compare them).
pub fn expand_values_with(backend: Backend, kvb: &Kvb, o_lat: &[f32], s: usize) -> Vec<f32> {
    let (kv, shape) = (&kvb.kv, kvb.shape);
    let (v, l) = (shape.v, kv.cols);
    assert_eq!(o_lat.len(), shape.heads * s * l, "o_lat");
    if kvb.keys_t.is_some() {
        return per_head(backend, kv, shape.heads, v, |h| shape.head(h) + shape.nope, o_lat, s);
    }
    let mut out = vec![0f32; shape.heads * s * v];
    if v == 0 || s == 0 {
        return out;
    }
    let wide = wide(backend, kv);
    crate::pool::parallel(|| {
        out.par_chunks_mut(s * v).enumerate().for_each(|(h, y)| {
            let x = &o_lat[h * s * l..(h + 1) * s * l];
            let first = shape.head(h) + shape.nope;
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: AVX-512F (`wide`); the head's rows are inside kv (`Kvb::as_stored`
                // checked its rows against the shape).
                unsafe { x86::expand_head(kv, first, v, x, y) };
                return;
            }
            let _ = wide;
            for j in 0..v {
                let row = kv.dequantize_row(first + j);
                for (y, x) in y.chunks_exact_mut(v).zip(x.chunks_exact(l)) {
                    y[j] = row.iter().zip(x).map(|(w, x)| w * x).sum();
                }
            }
        })
    });
    out
}

/// The plain definitions in f64 (for tests): `(q_lat, o)` of [`absorb_queries`] and
/// [`expand_values`].
/// A q8_0 kv_b's keys are its transposed copy's values, and its queries and latent outputs are
/// taken as they are (unquantized).
pub fn absorption_reference(kvb: &Kvb, q_nope: &[f32], o_lat: &[f32], s: usize) -> (Vec<f32>, Vec<f32>) {
    let (kv, shape) = (&kvb.kv, kvb.shape);
    let (p, v, l) = (shape.nope, shape.v, kv.cols);
    let mut q_lat = vec![0f32; shape.heads * s * l];
    let mut o = vec![0f32; shape.heads * s * v];
    for h in 0..shape.heads {
        let mut rows: Vec<Vec<f32>> = (0..p + v).map(|r| kv.dequantize_row(shape.head(h) + r)).collect();
        if let Some(t) = &kvb.keys_t {
            for c in 0..l {
                let keys = t.dequantize_row(h * l + c);
                rows.iter_mut().zip(&keys[..p]).for_each(|(row, &k)| row[c] = k);
            }
        }
        for i in 0..s {
            let hs = h * s + i;
            for c in 0..l {
                q_lat[hs * l + c] = (0..p).map(|r| q_nope[hs * p + r] as f64 * rows[r][c] as f64).sum::<f64>() as f32;
            }
            for j in 0..v {
                o[hs * v + j] = (0..l).map(|c| rows[p + j][c] as f64 * o_lat[hs * l + c] as f64).sum::<f64>() as f32;
            }
        }
    }
    (q_lat, o)
}

#[cfg(target_arch = "x86_64")]
// register-blocked loops index the accumulators and the rows by the same counter
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use crate::simd::{lane_mask, sum16};
    use crate::{Format, PackedMatrix};

    /// Rows ahead that [`absorb_cols`] prefetches, into L2 (as [`expand`] does 16 rows ahead).
    /// Measured on AMD Zen 4, bf16 kv_b of bench-small: a q8_0 decode step's absorbed products
    /// took 0.54–0.58 ms with 4 rows ahead into L1, 0.38–0.39 ms so.
    const AHEAD: usize = 8;

    /// Row formats of the loops: f32, bf16, FP8 (block-scaled, with whole blocks of 16 or more
    /// columns: see [`super::wide`]).
    const F32: u8 = 0;
    const BF16: u8 = 1;
    const FP8: u8 = 2;

    /// Bytes a value of format `K`.
    const fn width(k: u8) -> usize {
        match k {
            F32 => 4,
            BF16 => 2,
            _ => 1,
        }
    }

    /// 16 values of a row at `p` as f32: f32, bf16 widened by a shift, or FP8 through the f16
    /// with its bits (`format::fp8_via_f16`) times the block's `scale` (stored times 2^8), which
    /// gives each weight the bits of the dequantized row (`PackedMatrix::dequantize_row`).
    #[inline(always)]
    unsafe fn load<const K: u8>(p: *const u8, mask: __mmask16, scale: f32) -> __m512 {
        match K {
            F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
            BF16 => {
                let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            _ => {
                let b = _mm_maskz_loadu_epi8(mask, p as *const i8);
                let h = _mm256_and_si256(_mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(b)), _mm256_set1_epi16(0xbf80u16 as i16));
                _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(scale))
            }
        }
    }

    /// FP8 scale of the 16 columns from `c` of a row whose block scales are `scales`, 1 for the
    /// other formats.
    #[inline(always)]
    fn scale_at<const K: u8>(kv: &PackedMatrix, scales: &[f32], c: usize) -> f32 {
        match (K, kv.format) {
            (FP8, Format::Fp8 { block }) => scales[c / block[1]],
            _ => 1.0,
        }
    }

    /// `y: [S, L] = Σ_r q[s, r] · kv[first + r]` over the `P = q.len() / S` rows from `first`.
    ///
    /// # Safety
    /// AVX-512F (BW, VL); rows `first..first + P` inside `kv`, which is f32, bf16 or FP8 with
    /// column blocks of a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn absorb_head(kv: &PackedMatrix, first: usize, p: usize, q: &[f32], y: &mut [f32]) {
        match kv.format {
            Format::Bf16 => absorb::<BF16>(kv, first, p, q, y),
            Format::Fp8 { .. } => absorb::<FP8>(kv, first, p, q, y),
            _ => absorb::<F32>(kv, first, p, q, y),
        }
    }

    #[inline(always)]
    unsafe fn absorb<const K: u8>(kv: &PackedMatrix, first: usize, p: usize, q: &[f32], y: &mut [f32]) {
        let l = kv.cols;
        for (q, y) in q.chunks_exact(p).zip(y.chunks_exact_mut(l)) {
            // 256 latents at a time in 16 registers, then the rest 32 at a time
            let mut c0 = 0;
            while l - c0 >= 256 {
                absorb_cols::<K, 16>(kv, first, c0, q, y.as_mut_ptr().add(c0));
                c0 += 256;
            }
            while c0 < l {
                absorb_cols::<K, 2>(kv, first, c0, q, y.as_mut_ptr().add(c0));
                c0 += 32;
            }
        }
    }

    /// `y[..min(L - c0, 16·NV)] = Σ_r q[r] · kv[first + r][c0..]`.
    #[inline(always)]
    unsafe fn absorb_cols<const K: u8, const NV: usize>(kv: &PackedMatrix, first: usize, c0: usize, q: &[f32], y: *mut f32) {
        let (stride, vector) = (kv.row_bytes, 16 * width(K));
        let rows = kv.data.as_ptr().add(first * stride + c0 * width(K));
        let mut acc = [_mm512_setzero_ps(); NV];
        // (rows are padded to whole 32-value blocks, so every vector of the chunk is readable)
        for (r, &x) in q.iter().enumerate() {
            let (x, row) = (_mm512_set1_ps(x), rows.add(r * stride));
            // the row AHEAD rows on, line by line: a head's rows are one short stream, too short
            // for the hardware prefetcher to ramp up
            let ahead = row.wrapping_add(AHEAD * stride);
            for line in (0..NV * vector).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line) as *const i8);
            }
            let scales = if K == FP8 { kv.fp8_row_scales(first + r) } else { &[] };
            for i in 0..NV {
                let w = load::<K>(row.add(i * vector), u16::MAX, scale_at::<K>(kv, scales, c0 + 16 * i));
                acc[i] = _mm512_fmadd_ps(x, w, acc[i]);
            }
        }
        let left = kv.cols - c0;
        for i in 0..NV {
            _mm512_mask_storeu_ps(y.wrapping_add(16 * i), lane_mask(left.saturating_sub(16 * i)), acc[i]);
        }
    }

    /// `y: [S, V]`, `y[s, j] = kv[first + j] · x[s]` for the `V = y.len() / S` rows from `first`.
    ///
    /// # Safety
    /// As [`absorb_head`], for rows `first..first + V`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn expand_head(kv: &PackedMatrix, first: usize, v: usize, x: &[f32], y: &mut [f32]) {
        match kv.format {
            Format::Bf16 => expand::<BF16>(kv, first, v, x, y),
            Format::Fp8 { .. } => expand::<FP8>(kv, first, v, x, y),
            _ => expand::<F32>(kv, first, v, x, y),
        }
    }

    #[inline(always)]
    unsafe fn expand<const K: u8>(kv: &PackedMatrix, first: usize, v: usize, x: &[f32], y: &mut [f32]) {
        let (l, width) = (kv.cols, width(K));
        let rows = kv.data.as_ptr().add(first * kv.row_bytes);
        for (x, y) in x.chunks_exact(l).zip(y.chunks_exact_mut(v)) {
            for j0 in (0..v).step_by(16) {
                // 16 rows (the last block's missing ones repeat its last row; their sums are
                // not stored)
                let at = |k: usize| (j0 + k).min(v - 1);
                let row: [*const u8; 16] = std::array::from_fn(|k| rows.add(at(k) * kv.row_bytes));
                let scales: [&[f32]; 16] = std::array::from_fn(|k| if K == FP8 { kv.fp8_row_scales(first + at(k)) } else { &[] });
                let mut acc = [_mm512_setzero_ps(); 16];
                for c in (0..l).step_by(16) {
                    let m = lane_mask(l - c);
                    // the next 16 rows' line at this column (see `absorb_cols`)
                    if (c * width) % 64 == 0 {
                        for r in row {
                            _mm_prefetch::<_MM_HINT_T1>(r.wrapping_add(16 * kv.row_bytes + c * width) as *const i8);
                        }
                    }
                    let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(c));
                    for k in 0..16 {
                        let w = load::<K>(row[k].add(c * width), m, scale_at::<K>(kv, scales[k], c));
                        acc[k] = _mm512_fmadd_ps(xv, w, acc[k]);
                    }
                }
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(j0), lane_mask(v - j0), sum16(&acc));
            }
        }
    }
}
