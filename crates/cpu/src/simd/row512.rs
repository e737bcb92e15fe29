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

/// q4_K weights against one or two activation rows with AVX-512: each step takes 64 bytes of a
/// superblock (four 32-weight groups) where the 256-bit kernel takes 32, which halves the integer
/// work per weight byte, the bound of the 256-bit kernel at one activation row.
pub(crate) mod q4k_512 {
    use std::arch::x86_64::*;

    use crate::act::Activations;
    use crate::format::Q4K_BLOCK;
    use crate::simd::q4k_header;

    /// `vpermw` indices that spread group scales over the 16-bit lanes of one step: the low
    /// nibbles of step `i` are groups `4i` (lanes 0..16) and `4i + 2` (16..32), the high nibbles
    /// groups `4i + 1` and `4i + 3`.
    static SPREAD: [[i16; 32]; 4] = {
        let mut m = [[0i16; 32]; 4];
        let mut s = 0;
        while s < 4 {
            let (i, high) = (s / 2, s % 2);
            let mut l = 0;
            while l < 32 {
                m[s][l] = (4 * i + high + 2 * (l / 16)) as i16;
                l += 1;
            }
            s += 1;
        }
        m
    };

    /// `out[j][b] = W[j] · x[b0 + b]` for `nsb` superblocks per row.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW, AVX2, FMA and F16C; rows hold `nsb` superblocks and `a`
    /// is quantized for them.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn rows<const R: usize, const BT: usize>(
        rows: [*const u8; R],
        nsb: usize,
        a: &Activations,
        b0: usize,
        out: &mut [[f32; 8]; R],
    ) {
        let pc = a.padded_cols;
        let low = _mm512_set1_epi8(0x0f);
        let spread: [__m512i; 4] = std::array::from_fn(|s| _mm512_loadu_si512(SPREAD[s].as_ptr() as *const _));
        let mut acc = [[_mm512_setzero_ps(); BT]; R];
        let mut mins = [[_mm256_setzero_ps(); BT]; R];
        for sb in 0..nsb {
            // the activations of each step in the weights' order: groups 4i, 4i+2 | 4i+1, 4i+3
            let xv: [[[__m512i; 2]; 2]; BT] = std::array::from_fn(|b| {
                let xp = a.qs.as_ptr().add((b0 + b) * pc + sb * 256);
                let part = |o: usize| _mm256_loadu_si256(xp.add(o) as *const __m256i);
                let join = |lo: __m256i, hi: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                std::array::from_fn(|i| [join(part(128 * i), part(128 * i + 64)), join(part(128 * i + 32), part(128 * i + 96))])
            });
            for j in 0..R {
                let bp = rows[j].add(sb * Q4K_BLOCK.0);
                let (d, dmin, sc, mv) = q4k_header(bp);
                let scv = _mm512_castsi128_si512(sc);
                let mut sumi = [_mm512_setzero_si512(); BT];
                for i in 0..2 {
                    let q = _mm512_loadu_si512(bp.add(16 + 64 * i) as *const _);
                    let lo = _mm512_and_si512(q, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low);
                    let s_lo = _mm512_permutexvar_epi16(spread[2 * i], scv);
                    let s_hi = _mm512_permutexvar_epi16(spread[2 * i + 1], scv);
                    for b in 0..BT {
                        let p0 = _mm512_madd_epi16(_mm512_maddubs_epi16(lo, xv[b][i][0]), s_lo);
                        let p1 = _mm512_madd_epi16(_mm512_maddubs_epi16(hi, xv[b][i][1]), s_hi);
                        sumi[b] = _mm512_add_epi32(sumi[b], _mm512_add_epi32(p0, p1));
                    }
                }
                for b in 0..BT {
                    let dx = *a.d.get_unchecked((b0 + b) * (pc / 256) + sb);
                    let s16 = _mm256_loadu_si256(a.sums16.as_ptr().add((b0 + b) * (pc / 16) + sb * 16) as *const __m256i);
                    let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(mv, s16));
                    acc[j][b] = _mm512_fmadd_ps(_mm512_set1_ps(d * dx), _mm512_cvtepi32_ps(sumi[b]), acc[j][b]);
                    mins[j][b] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * dx), msum, mins[j][b]);
                }
            }
        }
        for j in 0..R {
            for b in 0..BT {
                let m = mins[j][b];
                let m = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_add_ss(m, _mm_movehdup_ps(m));
                out[j][b] = _mm512_reduce_add_ps(acc[j][b]) - _mm_cvtss_f32(m);
            }
        }
    }
}
