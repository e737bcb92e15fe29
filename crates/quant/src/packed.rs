//! `PackedLinear`: a weight resident in one of the CPU kernels' formats (f32, bf16, FP8
//! block-scaled, q8_0, q4_K, q6_K), multiplied by `moeserve-cpu`'s SIMD kernels. Activations
//! arrive and leave in the compute dtype; the kernels work in f32 (8-bit activations for the
//! ggml block formats).

use candle_core::{DType, Tensor};
use moeserve_core::{error::Context, Error, Result};
use moeserve_cpu::PackedMatrix;

use crate::linear::Linear;

#[derive(Debug)]
pub struct PackedLinear {
    name: String,
    w: PackedMatrix,
}

impl PackedLinear {
    pub fn new(name: impl Into<String>, w: PackedMatrix) -> Self {
        PackedLinear { name: name.into(), w }
    }
}

/// Several linears of the same input (`x: [.., in]`), e.g. q_a_proj and kv_a_proj: one kernel
/// call with one set of prepared activations when they are all CPU kernel matrices of one
/// format, each its own `forward` otherwise.
pub fn forward_same_input<const N: usize>(linears: [&dyn Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
    let packed: Option<Vec<&PackedMatrix>> = linears.iter().map(|l| l.packed()).collect();
    let same = |ws: &Vec<&PackedMatrix>| ws.windows(2).all(|p| p[0].format() == p[1].format() && p[0].cols() == p[1].cols());
    let outs: Vec<Tensor> = match packed.filter(same) {
        Some(ws) if !ws.is_empty() => {
            let (xs, rows) = rows_f32(x, ws[0].cols(), "linear input")?;
            let acts = moeserve_cpu::activations(ws[0], &xs, rows);
            let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; rows * w.rows()]).collect();
            let mut products: Vec<_> =
                ws.iter().zip(ys.iter_mut()).map(|(w, y)| moeserve_cpu::Product { w, x: &acts, y }).collect();
            moeserve_cpu::matmul_many(&mut products);
            let mut shape = x.dims().to_vec();
            ws.iter()
                .zip(ys)
                .map(|(w, y)| {
                    if let Some(last) = shape.last_mut() {
                        *last = w.rows();
                    }
                    Tensor::from_vec(y, shape.clone(), x.device())
                        .and_then(|t| t.to_dtype(x.dtype()))
                        .ctx(|| "linear output".into())
                })
                .collect::<Result<_>>()?
        }
        _ => linears.iter().map(|l| l.forward(x)).collect::<Result<_>>()?,
    };
    outs.try_into().map_err(|_| Error::Input("forward_same_input: output count".into()))
}

/// `x: [.., in]` as row-major f32 values and the number of rows.
pub fn rows_f32(x: &Tensor, in_dim: usize, what: &str) -> Result<(Vec<f32>, usize)> {
    let ctx = || format!("{what} input {:?}", x.dims());
    if x.dims().last() != Some(&in_dim) {
        return Err(Error::Input(format!("{what}: input {:?}, expected last dimension {in_dim}", x.dims())));
    }
    let v = x.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).ctx(ctx)?;
    let rows = v.len() / in_dim.max(1);
    Ok((v, rows))
}

impl Linear for PackedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xs, rows) = rows_f32(x, self.w.cols(), &self.name)?;
        let mut y = vec![0f32; rows * self.w.rows()];
        moeserve_cpu::matmul(&self.w, &xs, rows, &mut y);
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.w.rows();
        }
        let ctx = || format!("linear {} output", self.name);
        Tensor::from_vec(y, shape, x.device()).and_then(|t| t.to_dtype(x.dtype())).ctx(ctx)
    }

    fn in_dim(&self) -> usize {
        self.w.cols()
    }

    fn out_dim(&self) -> usize {
        self.w.rows()
    }

    fn format(&self) -> &'static str {
        self.w.format().name()
    }

    fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        let cols = self.w.cols();
        let v: Vec<f32> = (0..self.w.rows()).flat_map(|r| self.w.dequantize_row(r).into_iter().take(cols)).collect();
        Tensor::from_vec(v, (self.w.rows(), cols), &candle_core::Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .ctx(|| format!("{} to {dtype:?}", self.name))
    }

    fn resident_bytes(&self) -> usize {
        self.w.resident_bytes()
    }

    fn packed(&self) -> Option<&PackedMatrix> {
        Some(&self.w)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use moeserve_cpu::Format;

    use super::*;

    fn linear(format: Format, rows: usize, cols: usize, seed: u32) -> PackedLinear {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            .collect();
        PackedLinear::new(format!("w{seed}"), PackedMatrix::from_f32(format, rows, cols, &w).unwrap())
    }

    #[test]
    fn projections_of_one_input_match_their_own_forwards() {
        let x = Tensor::randn(0f32, 1.0, (3, 320), &Device::Cpu).unwrap();
        // one kernel call (same format), and the fallback (mixed formats)
        for formats in [[Format::Q4K, Format::Q4K], [Format::Q8_0, Format::Bf16]] {
            let (a, b) = (linear(formats[0], 48, 320, 1), linear(formats[1], 80, 320, 2));
            let [ya, yb] = forward_same_input([&a as &dyn Linear, &b], &x).unwrap();
            for (got, l) in [(ya, &a), (yb, &b)] {
                let want = l.forward(&x).unwrap();
                assert_eq!(got.dims(), want.dims());
                let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let m = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(m > 0.0 && d <= 1e-6 * m, "{formats:?}: {d} of {m}");
            }
        }
    }
}
