//! AVX-512 kernels for one or two activation rows, outside the `x86_kernels!` pair because they
//! have no AVX2 twin: the 512-bit registers are what makes them faster than the shared code.

/// FP8 weights against one or two activation rows with AVX-512: 32 weights per step, widened
/// to 16-bit in one instruction and converted by the f16 trick of `format::fp8_via_f16`.
pub(crate) mod fp8_512 {
    use std::arch::x86_64::*;

    /// `out[j][b] = Σ_k W[j, k] · x[b, k]`, with the scale of each `seg` columns (a multiple of 32).
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW, F16C and FMA; rows are `pc` bytes, `x` is `[BT, pc]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    pub(crate) unsafe fn rows<const R: usize, const BT: usize>(
        rows: [*const u8; R],
        scales: [&[f32]; R],
        seg: usize,
        pc: usize,
        x: *const f32,
        out: &mut [[f32; 8]; R],
    ) {
        let mask = _mm512_set1_epi16(0xbf80u16 as i16);
        let mut tot = [[_mm512_setzero_ps(); BT]; R];
        let mut k0 = 0;
        let mut si = 0;
        while k0 < pc {
            let k1 = (k0 + seg).min(pc);
            let mut acc = [[_mm512_setzero_ps(); BT]; R];
            for k in (k0..k1).step_by(32) {
                let xv: [[__m512; 2]; BT] =
                    std::array::from_fn(|b| [_mm512_loadu_ps(x.add(b * pc + k)), _mm512_loadu_ps(x.add(b * pc + k + 16))]);
                for j in 0..R {
                    let v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(rows[j].add(k) as *const __m256i));
                    let h = _mm512_and_si512(_mm512_slli_epi16::<7>(v), mask);
                    let w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
                    let w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h));
                    for b in 0..BT {
                        acc[j][b] = _mm512_fmadd_ps(w0, xv[b][0], acc[j][b]);
                        acc[j][b] = _mm512_fmadd_ps(w1, xv[b][1], acc[j][b]);
                    }
                }
            }
            for j in 0..R {
                for b in 0..BT {
                    tot[j][b] = _mm512_fmadd_ps(acc[j][b], _mm512_set1_ps(scales[j][si]), tot[j][b]);
                }
            }
            k0 = k1;
            si += 1;
        }
        for j in 0..R {
            for b in 0..BT {
                out[j][b] = _mm512_reduce_add_ps(tot[j][b]);
            }
        }
    }
}
