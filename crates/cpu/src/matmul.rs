//! Matrix × small batch: `y[b, r] = Σ_k x[b, k] · W[r, k]`, multi-threaded over output rows on
//! the kernels' threads (`pool`).
//!
//! [`matmul_many`] runs several independent products (e.g. every active expert of a MoE layer)
//! in one parallel region; [`matmul_reference`] is the plain path every kernel is tested against.

use std::sync::OnceLock;

use crate::act::Activations;
use crate::format::{PackedMatrix, Q8_0_GROUP};

pub(crate) fn available(backend: Backend) -> bool {
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => crate::simd::avx2::available(),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => crate::simd::avx512::available(),
        #[cfg(target_arch = "x86_64")]
        Backend::Amx => crate::amx::available(),
        Backend::Portable => true,
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

/// Which implementation runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// [`Backend::Avx512`], plus Intel AMX tiles for products with several activation rows: int8
    /// tiles for q8_0 and q4_K (8-bit activations, as the vector kernels), bf16 tiles for bf16 and
    /// q6_K (activations as bf16 high + low parts, f32 sums); see the `amx` module. f32 and
    /// FP8 weights keep the vector kernels.
    Amx,
    /// The same kernels compiled for AVX-512 (VL, BW, VNNI): larger tiles, `vpdpbusd`.
    Avx512,
    /// AVX2 + FMA + F16C kernels.
    Avx2,
    /// Dequantize a row, dot in f32: any CPU (and the reference).
    Portable,
}

/// The best backend of this CPU; `MOESERVE_CPU_KERNELS=avx512|avx2|portable` caps it.
pub fn backend() -> Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        let order: &[Backend] = match std::env::var("MOESERVE_CPU_KERNELS").as_deref() {
            Ok("portable") => &[],
            Ok("avx2") => &[Backend::Avx2],
            Ok("avx512") => &[Backend::Avx512, Backend::Avx2],
            _ => &[Backend::Amx, Backend::Avx512, Backend::Avx2],
        };
        order.iter().copied().find(|&b| available(b)).unwrap_or(Backend::Portable)
    })
}

/// One product of a [`matmul_many`] call. `x: [batch, w.cols()]`, `y: [batch, w.rows()]`.
pub struct Product<'a> {
    pub w: &'a PackedMatrix,
    pub x: &'a Activations,
    pub y: &'a mut [f32],
}

/// Prepare `x: [batch, w.cols()]` for `w`'s kernel (padding; 8-bit quantization for block formats).
pub fn activations(w: &PackedMatrix, x: &[f32], batch: usize) -> Activations {
    Activations::new(w.format, x, batch, w.cols, w.padded_cols)
}

/// `y: [batch, rows] = x: [batch, cols] · Wᵀ`.
pub fn matmul(w: &PackedMatrix, x: &[f32], batch: usize, y: &mut [f32]) {
    let a = activations(w, x, batch);
    matmul_many(&mut [Product { w, x: &a, y }]);
}

/// An output shared by the threads of a product.
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every work unit writes a disjoint set of output rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// (A method, so that closures capture the wrapper, not the bare pointer.)
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Run several products in one parallel region, split into row ranges of similar cost.
pub fn matmul_many(products: &mut [Product<'_>]) {
    matmul_many_with(backend(), products)
}

/// [`matmul_many`] on a chosen backend (tests compare them).
pub fn matmul_many_with(backend: Backend, products: &mut [Product<'_>]) {
    let backend = if available(backend) { backend } else { Backend::Portable };
    for p in products.iter() {
        assert_eq!(p.x.padded_cols, p.w.padded_cols, "activations prepared for another matrix");
        assert_eq!(p.y.len(), p.x.batch * p.w.rows, "output size");
    }
    // activations in the layout of the batched bf16 kernel, before the threads start (built on
    // first use, a thread would build them while the others wait)
    #[cfg(target_arch = "x86_64")]
    if matches!(backend, Backend::Avx512 | Backend::Amx) {
        for p in products.iter().filter(|p| crate::simd::batch_bf16::applies(p.w, p.x)) {
            p.x.bf16_quads();
        }
    }
    let total_bytes: usize = products.iter().map(|p| p.w.data.len()).sum();
    let threads = rayon::current_num_threads().max(1);
    // units of ~1/3 of a thread's share, at least 64 KiB: each unit starts its memory streams
    // cold, so fewer units are faster as long as the threads finish together (see below; a
    // 64 KiB floor rather than 16 KiB: bench-small decode steps 1.1 % faster with q4_K, 0.6 %
    // with q8_0, 2 % with FP8, as its attention projections are 0.2–0.8 MB)
    let unit_bytes = (total_bytes / (threads * 3)).max(64 << 10);
    let mut units = Vec::new();
    for (i, p) in products.iter().enumerate() {
        // whole AMX tiles of 32 rows where a unit has more than one
        let rows_per = (unit_bytes / p.w.row_bytes.max(1)).clamp(1, p.w.rows.max(1));
        let rows_per = if rows_per > 32 { rows_per.next_multiple_of(32) } else { rows_per };
        // grouped matrices (q8_0, q4_K, q6_K on AVX-512) in groups of 16 rows: whole groups a unit
        let rows_per = if p.w.grouped { rows_per.max(4 * Q8_0_GROUP).next_multiple_of(Q8_0_GROUP) } else { rows_per };
        let mut r = 0;
        while r < p.w.rows {
            units.push((i, r, (r + rows_per).min(p.w.rows)));
            r += rows_per;
        }
    }
    let outs: Vec<OutPtr> = products.iter_mut().map(|p| OutPtr(p.y.as_mut_ptr())).collect();
    let run = |&(i, r0, r1): &(usize, usize, usize)| {
        let p = &products[i];
        // SAFETY: units cover disjoint row ranges of each product's output.
        unsafe { rows(backend, p.w, p.x, r0, r1, outs[i].0, p.w.rows) }
    };
    // each thread takes the next unit in order when it is free (bench-small q4_K decode,
    // alternate steps: 6 units taken in order 2.0–2.5 % faster a step than rayon's halving over
    // 16; over 16 taken in order the same as rayon's; 32 units 5–6 % slower, 4 units 1 % slower)
    crate::pool::for_each_in_order(units.len(), |u| run(&units[u]));
}

/// `y[b * y_stride + r] = W[r] · x[b]` for the rows `r0..r1` on `backend` (available).
///
/// # Safety
/// `y` must be valid for those writes.
pub(crate) unsafe fn rows(
    backend: Backend,
    w: &PackedMatrix,
    a: &Activations,
    r0: usize,
    r1: usize,
    y: *mut f32,
    y_stride: usize,
) {
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => crate::simd::avx2::rows(w, a, r0, r1, y, y_stride),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => crate::simd::avx512::rows(w, a, r0, r1, y, y_stride),
        #[cfg(target_arch = "x86_64")]
        Backend::Amx if crate::amx::applies(w, a) => crate::amx::rows(w, a, r0, r1, y, y_stride),
        #[cfg(target_arch = "x86_64")]
        Backend::Amx => crate::simd::avx512::rows(w, a, r0, r1, y, y_stride),
        _ => {
            for r in r0..r1 {
                let wr = w.dequantize_row(r);
                for b in 0..a.batch {
                    let x = &a.f32[b * a.padded_cols..(b + 1) * a.padded_cols];
                    *y.add(b * y_stride + r) = wr.iter().zip(x).map(|(w, x)| w * x).sum();
                }
            }
        }
    }
}

/// `y[r] = W[r] · x[b]` for the rows `r0..r1` and the one activation row `b` on `backend`
/// (available): a grouped format's vector kernels, else a row at a time.
///
/// # Safety
/// `b < a.batch`, rows `r0..r1` inside `w`, and `y` valid for those writes.
pub(crate) unsafe fn rows_of(backend: Backend, w: &PackedMatrix, a: &Activations, b: usize, r0: usize, r1: usize, y: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if w.grouped {
        match backend {
            Backend::Avx2 => return crate::simd::avx2::grouped_rows_of(w, a, b, r0, r1, y),
            Backend::Avx512 | Backend::Amx => return crate::simd::avx512::grouped_rows_of(w, a, b, r0, r1, y),
            Backend::Portable => {}
        }
    }
    let x = &a.f32[b * a.padded_cols..(b + 1) * a.padded_cols];
    for r in r0..r1 {
        *y.add(r) = w.dequantize_row(r).iter().zip(x).map(|(w, x)| w * x).sum();
    }
}

/// The reference: every row dequantized, dot products accumulated in f64.
pub fn matmul_reference(w: &PackedMatrix, x: &[f32], batch: usize, y: &mut [f32]) {
    for r in 0..w.rows {
        let wr = w.dequantize_row(r);
        for b in 0..batch {
            let xb = &x[b * w.cols..(b + 1) * w.cols];
            y[b * w.rows + r] = wr.iter().zip(xb).map(|(&w, &x)| w as f64 * x as f64).sum::<f64>() as f32;
        }
    }
}
