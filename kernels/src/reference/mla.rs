//! Reference of `mla_decode.cu`: absorbed-form MLA attention of single query rows over the
//! paged latent cache.

/// Shapes and constants of one decode call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaShape {
    pub heads: usize,
    /// kv_lora_rank (512 for R1)
    pub latent: usize,
    /// qk_rope_head_dim (64 for R1)
    pub rope: usize,
    pub page_size: usize,
    /// Columns of the block table.
    pub max_pages: usize,
    /// The model's softmax scale (YaRN mscale² included).
    pub scale: f32,
}

impl MlaShape {
    /// Width of a cache row and of a query row: latent + rope.
    pub fn row_dim(&self) -> usize {
        self.latent + self.rope
    }
}

/// `q: [nq, heads, latent + rope]` (`[q_nope · W_UK | q_pe]`), `pool: [rows, latent + rope]`,
/// `block_table: [nq, max_pages]`, `kv_lens: [nq]` -> `[nq, heads, latent]`:
/// `softmax_t(scale · q · row_t) · c_kv_t` over the first `kv_lens[i]` tokens.
pub fn mla_decode(s: &MlaShape, q: &[f32], pool: &[f32], block_table: &[i32], kv_lens: &[i32]) -> Vec<f32> {
    let d = s.row_dim();
    let mut out = vec![0f32; kv_lens.len() * s.heads * s.latent];
    for (i, &len) in kv_lens.iter().enumerate() {
        let rows: Vec<&[f32]> = (0..len as usize)
            .map(|t| {
                let r = block_table[i * s.max_pages + t / s.page_size] as usize * s.page_size + t % s.page_size;
                &pool[r * d..(r + 1) * d]
            })
            .collect();
        for h in 0..s.heads {
            let qh = &q[(i * s.heads + h) * d..(i * s.heads + h + 1) * d];
            let scores: Vec<f64> =
                rows.iter().map(|r| r.iter().zip(qh).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * s.scale as f64).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            let o = &mut out[(i * s.heads + h) * s.latent..(i * s.heads + h + 1) * s.latent];
            for (p, r) in e.iter().zip(&rows) {
                for (o, v) in o.iter_mut().zip(&r[..s.latent]) {
                    *o += (p / sum * *v as f64) as f32;
                }
            }
        }
    }
    out
}

/// Split the `max_len` tokens into `splits` ranges for `blocks` blocks on `sms` multiprocessors:
/// enough splits to give every SM two blocks, none shorter than 64 tokens. Returns
/// (splits, tokens per split), the latter a multiple of 8 (the kernels' tile).
pub fn plan_splits(max_len: usize, blocks: usize, sms: usize) -> (usize, usize) {
    let max_len = max_len.max(1);
    let want = (2 * sms).div_ceil(blocks.max(1));
    let splits = want.clamp(1, max_len.div_ceil(64)).min(64);
    let per = max_len.div_ceil(splits).div_ceil(8) * 8;
    (max_len.div_ceil(per), per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_returns_its_latent() {
        let s = MlaShape { heads: 2, latent: 3, rope: 1, page_size: 2, max_pages: 1, scale: 0.5 };
        let pool = [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 9.0]; // page 0: rows 0, 1
        let out = mla_decode(&s, &[1.0; 8], &pool[4..], &[0], &[1]);
        // pool slice starts at row 1, table page 0 -> row 0 of the slice
        assert_eq!(out, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    /// The reference against the model's absorbed-form candle math (`Mla::attend_absorbed`:
    /// scores = q_lat·c_kvᵀ + q_pe·k_peᵀ, softmax(scale · scores), p·c_kv) on a paged layout.
    #[test]
    fn matches_the_absorbed_candle_math() {
        use candle_core::{Device, Tensor};
        let s = MlaShape { heads: 5, latent: 24, rope: 8, page_size: 4, max_pages: 6, scale: 0.3 };
        let (d, len) = (s.row_dim(), 21);
        let dev = Device::Cpu;
        let pool = Tensor::randn(0f32, 1.0, (40, d), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (1, s.heads, d), &dev).unwrap();
        let table: Vec<i32> = vec![7, 2, 9, 0, 4, 5];
        let rows: Vec<u32> = (0..len).map(|t| (table[t / 4] * 4) as u32 + (t % 4) as u32).collect();
        let entries = pool.index_select(&Tensor::new(rows.as_slice(), &dev).unwrap(), 0).unwrap(); // [T, L+R]
        let c_kv = entries.narrow(1, 0, s.latent).unwrap();
        let k_pe = entries.narrow(1, s.latent, s.rope).unwrap();
        let qh = q.squeeze(0).unwrap(); // [H, L+R]
        let q_lat = qh.narrow(1, 0, s.latent).unwrap();
        let q_pe = qh.narrow(1, s.latent, s.rope).unwrap();
        let scores = (q_lat.matmul(&c_kv.t().unwrap()).unwrap() + q_pe.matmul(&k_pe.t().unwrap()).unwrap()).unwrap(); // [H, T]
        let x = (scores * s.scale as f64).unwrap();
        let e = x.broadcast_sub(&x.max_keepdim(1).unwrap()).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
        let want: Vec<f32> = p.matmul(&c_kv.contiguous().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = mla_decode(
            &s,
            &q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &pool.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &table,
            &[len as i32],
        );
        let e = crate::reference::relative_error(&got, &want);
        assert!(e < 1e-5, "relative error {e}");
    }

    #[test]
    fn splits_cover_the_sequence() {
        for (len, blocks, sms) in [(1, 8, 132), (5000, 8, 132), (100_000, 1024, 132), (63, 1, 1)] {
            let (n, per) = plan_splits(len, blocks, sms);
            assert!((1..=64).contains(&n) && per % 8 == 0 && n * per >= len && (n - 1) * per < len, "{len}: {n} x {per}");
        }
    }
}
