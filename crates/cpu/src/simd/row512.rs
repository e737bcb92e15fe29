//! AVX-512 kernels outside the `x86_kernels!` pair, because they have no AVX2 twin: FP8 weights
//! (the 512-bit registers are what makes them faster than the shared code) and bf16 × bf16
//! (`vdpbf16ps`).

/// FP8 weights against up to 4 activation rows with AVX-512, in one of two decodings:
///
/// - **f16** ([`Decode::F16`]): 32 weights per step, widened to 16-bit in one instruction and
///   converted by the f16 trick of `format::fp8_via_f16`, then `vcvtph2ps`;
/// - **integer** ([`Decode::Integer`]): 16 weights per step, sign-extended to 32-bit lanes and
///   shifted so that the E4M3 exponent and mantissa land in the f32 fields with the sign kept
///   (`(b << 20) & 0x87f0_0000`). That f32 is the weight times 2^-120 exactly, subnormal E4M3
///   values included (they become f32 subnormals of the same spacing); the factor is applied
///   with the block scale. Three integer instructions per 16 weights and no conversion: on AMD Zen 4,
///   8192 × 4096, 0.90–0.96 of the read bandwidth against 0.82–0.85 for the f16 decoding.
///
/// The integer decoding feeds the FMAs subnormal operands and, from a zero accumulator, subnormal
/// results. AMD's FPUs take them at full speed; Intel's need a microcode assist for subnormal
/// results (without flush-to-zero), so Intel keeps the f16 decoding ([`decode`]).
// Register-blocked loops index several accumulator arrays by the same counters.
#[allow(clippy::needless_range_loop)]
pub(crate) mod fp8_512 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// How the FP8 bytes become f32 (see the module).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Decode {
        F16,
        Integer,
    }

    /// The decoding for this CPU: the integer one where subnormal floats cost nothing extra (AMD).
    pub(crate) fn decode() -> Decode {
        static D: OnceLock<Decode> = OnceLock::new();
        *D.get_or_init(|| {
            // SAFETY: cpuid leaf 0 exists on every x86-64 CPU (the intrinsic is safe from Rust 1.87)
            #[allow(unused_unsafe)]
            let id = unsafe { __cpuid(0) };
            let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            if vendor == b"AuthenticAMD" {
                Decode::Integer
            } else {
                Decode::F16
            }
        })
    }

    /// `out[j][b] = Σ_k W[j, k] · x[b, k]`, with the scale of each `seg` columns (a multiple of 32).
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW, F16C and FMA; rows are `pc` bytes, `x` is `[BT, pc]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    pub(crate) unsafe fn rows<const R: usize, const BT: usize>(
        decode: Decode,
        rows: [*const u8; R],
        scales: [&[f32]; R],
        seg: usize,
        pc: usize,
        x: *const f32,
        out: &mut [[f32; 8]; R],
    ) {
        // the stored scales carry the f16 decoding's 2^8; the integer decoding's weights are the
        // E4M3 values times 2^-120, so its blocks take another 2^112
        let unit = match decode {
            Decode::F16 => 1.0,
            Decode::Integer => f32::from_bits((127 + 120) << 23) / crate::format::FP8_VIA_F16_FACTOR,
        };
        let mut tot = [[_mm512_setzero_ps(); BT]; R];
        let mut k0 = 0;
        let mut si = 0;
        while k0 < pc {
            let k1 = (k0 + seg).min(pc);
            let acc = match decode {
                Decode::F16 => segment::<false, R, BT>(rows, k0, k1, pc, x),
                Decode::Integer => segment::<true, R, BT>(rows, k0, k1, pc, x),
            };
            for j in 0..R {
                let s = _mm512_set1_ps(scales[j][si] * unit);
                for b in 0..BT {
                    tot[j][b] = _mm512_fmadd_ps(acc[j][b], s, tot[j][b]);
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

    /// Columns `k0..k1` of one scale block, unscaled: times 2^-8 by the f16 decoding, times 2^-120
    /// by the integer one (`INTEGER`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn segment<const INTEGER: bool, const R: usize, const BT: usize>(
        rows: [*const u8; R],
        k0: usize,
        k1: usize,
        pc: usize,
        x: *const f32,
    ) -> [[__m512; BT]; R] {
        let f16_mask = _mm512_set1_epi16(0xbf80u16 as i16);
        // sign (bit 31, the sign-extension's copy of bit 7), exponent and mantissa (bits 26..20)
        let f32_fields = _mm512_set1_epi32(0x87f0_0000u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); BT]; R];
        for k in (k0..k1).step_by(32) {
            if k % 64 == 0 {
                for j in 0..R {
                    crate::simd::prefetch_row(rows[j].add(k));
                }
            }
            let xv: [[__m512; 2]; BT] =
                std::array::from_fn(|b| [_mm512_loadu_ps(x.add(b * pc + k)), _mm512_loadu_ps(x.add(b * pc + k + 16))]);
            for j in 0..R {
                let w: [__m512; 2] = if INTEGER {
                    std::array::from_fn(|h| {
                        let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(rows[j].add(k + 16 * h) as *const __m128i));
                        _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32::<20>(v), f32_fields))
                    })
                } else {
                    let v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(rows[j].add(k) as *const __m256i));
                    let h = _mm512_and_si512(_mm512_slli_epi16::<7>(v), f16_mask);
                    [_mm512_cvtph_ps(_mm512_castsi512_si256(h)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h))]
                };
                for b in 0..BT {
                    acc[j][b] = _mm512_fmadd_ps(w[0], xv[b][0], acc[j][b]);
                    acc[j][b] = _mm512_fmadd_ps(w[1], xv[b][1], acc[j][b]);
                }
            }
        }
        acc
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::format::fp8_via_f16;

        /// Both decodings on every finite E4M3 byte (subnormals included), against the f64 sum of
        /// the decoded weights, for 1 and 2 rows × 1 and 4 activation rows and several blocks.
        #[test]
        fn both_decodings_match_the_definition() {
            if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("f16c"))
            {
                return;
            }
            let (seg, pc) = (64, 256);
            let bytes: Vec<u8> =
                (0..2 * pc).map(|i| ((i * 37 + 11) % 256) as u8).map(|b| if b & 0x7f == 0x7f { 0 } else { b }).collect();
            // includes activations below 1, so that the integer decoding's products are subnormal
            let x: Vec<f32> = (0..4 * pc).map(|i| ((i * 29 % 97) as f32 - 48.0) / 61.0).collect();
            let scales = [vec![0.5f32, 2.0, 0.01, 3.0], vec![1.0f32, 0.25, 7.0, 0.125]];
            let want = |j: usize, b: usize| -> f64 {
                (0..pc).map(|k| fp8_via_f16(bytes[j * pc + k]) as f64 * scales[j][k / seg] as f64 * x[b * pc + k] as f64).sum()
            };
            for decode in [Decode::F16, Decode::Integer] {
                let mut out = [[0f32; 8]; 2];
                // SAFETY: features checked above; rows are pc bytes and x is [4, pc].
                unsafe {
                    rows::<2, 4>(
                        decode,
                        [bytes.as_ptr(), bytes.as_ptr().add(pc)],
                        [&scales[0], &scales[1]],
                        seg,
                        pc,
                        x.as_ptr(),
                        &mut out,
                    )
                };
                for j in 0..2 {
                    for b in 0..4 {
                        let (got, want) = (out[j][b] as f64, want(j, b));
                        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{decode:?} row {j} x {b}: {got} vs {want}");
                    }
                }
                let mut one = [[0f32; 8]; 1];
                // SAFETY: as above.
                unsafe { rows::<1, 1>(decode, [bytes.as_ptr().add(pc)], [&scales[1]], seg, pc, x.as_ptr().add(pc), &mut one) };
                let w = want(1, 1);
                assert!((one[0][0] as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "{decode:?} 1x1: {} vs {w}", one[0][0]);
            }
        }
    }
}

/// bf16 weights × activations that are exactly bf16 (`Activations::bf16_exact`, a `--dtype bf16`
/// model) with `vdpbf16ps`: 32 products a instruction, exact, summed in f32. Converting the
/// weights to f32 for FMAs takes two FMAs per 32 products, so with several activation rows,
/// where the multiplies and not the memory stream set the time, this kernel is up to twice as
/// fast. Four weight rows at a time (four memory streams per thread, from four parts of the
/// range) against tiles of up to 4 activation rows.
#[allow(clippy::needless_range_loop)]
pub(crate) mod bf16_512 {
    use std::arch::x86_64::*;

    use crate::act::Activations;
    use crate::format::PackedMatrix;

    /// Weight rows a tile (memory streams per thread).
    const R: usize = 4;
    /// Activation rows a tile: 4 × 4 accumulators (4 × 8 or 3 × 8 measured no faster at batch 8).
    pub(crate) const TILE_ROWS: usize = 4;

    /// `y[b * y_stride + r] = W[r] · x[b]` for the rows `r0..r1` and every activation row.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL and BF16, `w` is bf16, `a` was prepared for it with
    /// `bf16_exact` set, and `y` must be valid for the writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(crate) unsafe fn rows(w: &PackedMatrix, a: &Activations, r0: usize, r1: usize, y: *mut f32, y_stride: usize) {
        let Some(x) = a.bf16_exact.as_deref() else {
            debug_assert!(false, "bf16_512 without bf16 activations");
            return;
        };
        let row = |r: usize| w.row(r).as_ptr() as *const u16;
        let part = (r1 - r0) / R;
        for i in 0..part {
            let rr: [usize; R] = std::array::from_fn(|k| r0 + k * part + i);
            tiles(rr.map(row), rr, x, a, y, y_stride);
        }
        for r in r0 + R * part..r1 {
            tiles([row(r)], [r], x, a, y, y_stride);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tiles<const N: usize>(
        rows: [*const u16; N],
        rr: [usize; N],
        x: &[u16],
        a: &Activations,
        y: *mut f32,
        y_stride: usize,
    ) {
        let pc = a.padded_cols;
        in_batch_tiles(rr, x, a, y, y_stride, |bt, xb, out| match bt {
            1 => tile::<N, 1>(rows, xb, pc, out),
            2 => tile::<N, 2>(rows, xb, pc, out),
            3 => tile::<N, 3>(rows, xb, pc, out),
            _ => tile::<N, 4>(rows, xb, pc, out),
        });
    }

    /// The activation rows of a `vdpbf16ps` kernel (bf16 bits `x: [batch, padded_cols]`) in
    /// tiles of up to [`TILE_ROWS`]: `tile(rows, their first row's bits, sums)` for each, its
    /// sums `out[j][i]` stored to `y[(b0 + i) * y_stride + rr[j]]`.
    ///
    /// # Safety
    /// `y` must be valid for those writes.
    pub(crate) unsafe fn in_batch_tiles<const N: usize>(
        rr: [usize; N],
        x: &[u16],
        a: &Activations,
        y: *mut f32,
        y_stride: usize,
        mut tile: impl FnMut(usize, *const u16, &mut [[f32; TILE_ROWS]; N]),
    ) {
        let mut b0 = 0;
        while b0 < a.batch {
            let bt = (a.batch - b0).min(TILE_ROWS);
            let mut out = [[0f32; TILE_ROWS]; N];
            tile(bt, x.as_ptr().add(b0 * a.padded_cols), &mut out);
            for (o, &r) in out.iter().zip(&rr) {
                for (i, v) in o.iter().take(bt).enumerate() {
                    *y.add((b0 + i) * y_stride + r) = *v;
                }
            }
            b0 += bt;
        }
    }

    /// `out[j][b] = W[rows[j]] · x[b]`, 32 columns a step (`pc` is a multiple of 32).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile<const N: usize, const BT: usize>(
        rows: [*const u16; N],
        x: *const u16,
        pc: usize,
        out: &mut [[f32; TILE_ROWS]; N],
    ) {
        let mut acc = [[_mm512_setzero_ps(); BT]; N];
        for k in (0..pc).step_by(32) {
            for j in 0..N {
                crate::simd::prefetch_row(rows[j].add(k) as *const u8);
            }
            let wv: [__m512bh; N] = std::array::from_fn(|j| std::mem::transmute(_mm512_loadu_si512(rows[j].add(k) as *const _)));
            for b in 0..BT {
                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x.add(b * pc + k) as *const _));
                for j in 0..N {
                    acc[j][b] = _mm512_dpbf16_ps(acc[j][b], wv[j], xv);
                }
            }
        }
        for j in 0..N {
            for b in 0..BT {
                out[j][b] = _mm512_reduce_add_ps(acc[j][b]);
            }
        }
    }
}

/// q6_K rows (ggml's block layout as stored) against up to 8 activation rows with AVX-512 VNNI.
///
/// Per 128-column half of a superblock, one 64-byte load of the low nibbles and one 32-byte load
/// of the high bits (broadcast to both 256-bit halves, shifted per half by `vpsllvw` /
/// `vpsrlvw`) give two vectors of 64 six-bit values (`q + 32`, 0–63): 9 integer instructions
/// for 128 weights of a row, shared by every activation row. Per activation row, `vpdpbusd`
/// against the 8-bit activations leaves `Σ q · x` of 4 columns in each 32-bit lane (at most
/// 4 · 63 · 127: a 16-bit value); `vpackssdw` pairs the two vectors' lanes so that each 16-bit
/// pair belongs to one 16-column block, and `vpmaddwd` multiplies them by the blocks' scales. The
/// stored offset of 32 comes off once per superblock (`vpmaddwd` of the scales and the
/// activations' 16-column sums), and the superblock's integer sum takes one conversion and one
/// `fma` by `d · dx`. Per 256 weights and activation row that is 4 `vpdpbusd`, 3 `vpmaddwd` and
/// 1 `fma`, against the AVX2 kernel's 16 multiplies of half width and its per-16-column scales.
///
/// The operations of one output are the same at any tile shape: a row has the same bits in a
/// batch as alone.
#[allow(clippy::needless_range_loop)]
pub(crate) mod q6k_512 {
    use std::arch::x86_64::*;

    use std::sync::LazyLock;

    use crate::act::Activations;
    use crate::format::Q6K_BLOCK;

    /// Per 16-bit word: the left and right shifts of the high bits, then the scale indices of
    /// half 0 and half 1 (see `rows`).
    static Q6K_CONSTANTS: LazyLock<[[i16; 32]; 4]> = LazyLock::new(|| {
        let half = |lo: i16, hi: i16| std::array::from_fn(|w| if w < 16 { lo } else { hi });
        let blocks = |h: usize| std::array::from_fn(|w| (8 * h + if w % 8 < 4 { w / 8 } else { 4 + w / 8 }) as i16);
        [half(4, 2), half(0, 2), blocks(0), blocks(1)]
    });

    /// `out[j][b] = W[rows[j]] · x[b0 + b]` over `nsb` superblocks.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/VNNI and F16C; each row holds `nsb` q6_K blocks, and `a`
    /// was prepared for q6_K with at least `b0 + BT` rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(crate) unsafe fn rows<const R: usize, const BT: usize>(
        rows: [*const u8; R],
        nsb: usize,
        a: &Activations,
        b0: usize,
        out: &mut [[f32; 8]; R],
    ) {
        let pc = a.padded_cols;
        let xq = a.qs.as_ptr().add(b0 * pc);
        let sums16 = a.sums16.as_ptr().add(b0 * pc / 16);
        let dx = a.d.as_ptr().add(b0 * nsb);
        let (low4, bits45) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        // the high bits' shifts, per 16-bit word: in the low 256 bits (columns 0–31 and 64–95 of
        // the half) bits 0–1 and 4–5 move to 4–5, in the high 256 bits (32–63, 96–127) bits 2–3
        // and 6–7; and the scale of 16-bit word w of a packed pair of vectors, block
        // 4 · (w % 8 >= 4) + w / 8 of the half (`vpackssdw`'s order per 128-bit lane). Read from
        // memory where used (registers are short)
        let c = &*Q6K_CONSTANTS;
        let ptr = |i: usize| c[i].as_ptr() as *const __m512i;
        // superblock `sb` of row `j` into its activation rows' sums
        let superblock = |j: usize, sb: usize, acc: &mut [__m512; BT]| {
            let bp = rows[j].add(sb * Q6K_BLOCK.0);
            for l in 0..4 {
                crate::simd::prefetch_row(bp.add(64 * l));
            }
            let sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(192) as *const __m128i)));
            let scales: [__m512i; 2] =
                std::array::from_fn(|h| _mm512_permutexvar_epi16(_mm512_loadu_si512(ptr(2 + h) as *const _), sc));
            let v: [[__m512i; 2]; 2] = std::array::from_fn(|h| {
                let l = _mm512_loadu_si512(bp.add(64 * h) as *const _);
                let hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(bp.add(128 + 32 * h) as *const __m256i));
                let (up, down) = (_mm512_loadu_si512(ptr(0) as *const _), _mm512_loadu_si512(ptr(1) as *const _));
                [
                    _mm512_or_si512(_mm512_and_si512(l, low4), _mm512_and_si512(_mm512_sllv_epi16(hb, up), bits45)),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(l), low4),
                        _mm512_and_si512(_mm512_srlv_epi16(hb, down), bits45),
                    ),
                ]
            });
            let d = crate::simd::f16_at(bp.add(208));
            let one = |b: usize, acc: &mut [__m512; BT]| {
                let x = xq.add(b * pc + sb * 256);
                // the stored values' offset: 32 · Σ over the blocks of scale · activation sum
                let s16 = _mm256_loadu_si256(sums16.add(b * pc / 16 + sb * 16) as *const __m256i);
                let corr = _mm512_slli_epi32::<5>(_mm512_zextsi256_si512(_mm256_madd_epi16(_mm512_castsi512_si256(sc), s16)));
                let mut isum = _mm512_sub_epi32(_mm512_setzero_si512(), corr);
                for h in 0..2 {
                    let s: [__m512i; 2] = std::array::from_fn(|k| {
                        let c = 128 * h + 64 * k;
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[h][k], _mm512_loadu_si512(x.add(c) as *const _))
                    });
                    isum = _mm512_add_epi32(isum, _mm512_madd_epi16(_mm512_packs_epi32(s[0], s[1]), scales[h]));
                }
                let scale = _mm512_set1_ps(d * *dx.add(b * nsb + sb));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[b]);
            };
            for b in 0..BT {
                one(b, acc);
            }
        };
        let mut acc = [[_mm512_setzero_ps(); BT]; R];
        for sb in 0..nsb {
            for j in 0..R {
                superblock(j, sb, &mut acc[j]);
            }
        }
        for j in 0..R {
            for b in 0..BT {
                out[j][b] = _mm512_reduce_add_ps(acc[j][b]);
            }
        }
    }
}
