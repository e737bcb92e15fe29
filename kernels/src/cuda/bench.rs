//! Kernel micro-benchmarks against floors measured in the same run: device copy bandwidth
//! (a 1 GiB device-to-device copy into an allocated buffer, bytes read + written) and the bf16 matmul rate (cuBLAS via
//! candle, 8192³). Printed by `moeserve bench --kernels --device cuda`.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

use super::ops::{self, GpuWeight};
use crate::reference::mla::MlaShape;

/// One measured kernel: its rate and the fraction of its floor.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub seconds: f64,
    /// GB/s for memory-bound kernels, TFLOP/s for compute-bound ones.
    pub rate: f64,
    pub unit: &'static str,
    /// rate / floor (copy bandwidth or matmul rate).
    pub of_floor: f64,
    pub floor: &'static str,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub copy_gbps: f64,
    pub matmul_tflops: f64,
    pub rows: Vec<Row>,
}

/// Median seconds of `iters` timed runs of `f` (after one warm-up), synchronizing the device.
fn time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn fp8_weight(dev: &Device, n: usize, k: usize) -> Result<GpuWeight> {
    // every byte 0x30 (0.5): the kernels' time does not depend on the values
    let data = Tensor::full(0x30u8, (n, k), dev)?;
    let scale = Tensor::ones((n.div_ceil(128), k.div_ceil(128)), DType::F32, dev)?;
    Ok(GpuWeight { data, scale: Some((scale * 0.01)?), block: [128, 128] })
}

/// Run every benchmark on `dev` (a CUDA device).
pub fn run(dev: &Device) -> Result<Report> {
    // floors
    // into a buffer allocated once: `Tensor::copy` would time a 1 GiB allocation as well
    let buf = Tensor::randn(0f32, 1.0, 1usize << 28, dev)?; // 1 GiB
    let dst = Tensor::zeros(1usize << 28, DType::F32, dev)?;
    let copy_s = time(dev, 5, || dst.slice_set(&buf, 0, 0))?;
    let copy_gbps = 2.0 * (1u64 << 30) as f64 / copy_s / 1e9;
    let s = 8192;
    let a = Tensor::randn(0f32, 1.0, (s, s), dev)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (s, s), dev)?.to_dtype(DType::BF16)?;
    let mm_s = time(dev, 5, || a.matmul(&b).map(|_| ()))?;
    let matmul_tflops = 2.0 * (s as f64).powi(3) / mm_s / 1e12;
    let mut rows = Vec::new();
    let mem = |name: String, seconds: f64, bytes: f64| Row {
        name,
        seconds,
        rate: bytes / seconds / 1e9,
        unit: "GB/s",
        of_floor: bytes / seconds / 1e9 / copy_gbps,
        floor: "copy bw",
    };
    let flops = |name: String, seconds: f64, fl: f64| Row {
        name,
        seconds,
        rate: fl / seconds / 1e12,
        unit: "TFLOP/s",
        of_floor: fl / seconds / 1e12 / matmul_tflops,
        floor: "bf16 matmul",
    };

    // MLA decode: R1 shapes, bf16 cache, batch x context
    for (batch, ctx) in [(1usize, 32_768usize), (64, 4096), (128, 8192)] {
        let shape = MlaShape { heads: 128, latent: 512, rope: 64, page_size: 64, max_pages: ctx / 64, scale: 0.1 };
        let d = shape.row_dim();
        let pool = Tensor::randn(0f32, 1.0, (batch * ctx, d), dev)?.to_dtype(DType::BF16)?;
        let q = Tensor::randn(0f32, 1.0, (batch, 128, d), dev)?.to_dtype(DType::BF16)?;
        let table: Vec<i32> = (0..(batch * ctx / 64) as i32).collect();
        let lens = vec![ctx as i32; batch];
        let t = time(dev, 5, || ops::mla_decode(&q, &pool, &table, &lens, &shape).map(|_| ()))?;
        let bytes = (batch * ctx * d * 2 + batch * 128 * (d + 512) * 2) as f64;
        rows.push(mem(format!("mla_decode bf16 b{batch} ctx{ctx}"), t, bytes));
    }
    // FP8 GEMM: decode (weight-bound) and prefill (compute-bound) shapes
    let (n, k) = (7168, 2048);
    let w = fp8_weight(dev, n, k)?;
    for m in [1usize, 16] {
        let x = Tensor::randn(0f32, 1.0, (m, k), dev)?.to_dtype(DType::BF16)?;
        let t = time(dev, 10, || ops::gemm(&x, &w).map(|_| ()))?;
        rows.push(mem(format!("fp8 gemm m{m} [{n}, {k}]"), t, (n * k + n * k / 16384 * 4 + m * (k + n) * 2) as f64));
    }
    let x = Tensor::randn(0f32, 1.0, (4096, k), dev)?.to_dtype(DType::BF16)?;
    let t = time(dev, 5, || ops::gemm(&x, &w).map(|_| ()))?;
    rows.push(flops(format!("fp8 gemm m4096 [{n}, {k}]"), t, 2.0 * 4096.0 * n as f64 * k as f64));
    let wb = GpuWeight { data: Tensor::randn(0f32, 0.05, (n, k), dev)?.to_dtype(DType::BF16)?, scale: None, block: [128, 128] };
    let t = time(dev, 5, || ops::gemm(&x, &wb).map(|_| ()))?;
    rows.push(flops(format!("bf16 tiled gemm m4096 [{n}, {k}]"), t, 2.0 * 4096.0 * n as f64 * k as f64));

    // grouped MoE (R1 expert shape: gate/up [2048, 7168]): 64 active experts x 64 rows
    let (en, ek, groups, per) = (2048, 7168, 64, 64);
    let tokens = groups * per / 8;
    let x = Tensor::randn(0f32, 1.0, (tokens, ek), dev)?.to_dtype(DType::BF16)?;
    let row_idx: Vec<i32> = (0..groups * per).map(|i| (i % tokens) as i32).collect();
    let offsets: Vec<i32> = (0..=groups).map(|g| (g * per) as i32).collect();
    let fl = 2.0 * (groups * per) as f64 * en as f64 * ek as f64;
    let experts: Vec<GpuWeight> = (0..groups).map(|_| fp8_weight(dev, en, ek)).collect::<Result<_>>()?;
    let refs: Vec<&GpuWeight> = experts.iter().collect();
    let t = time(dev, 3, || ops::grouped_gemm(&x, &row_idx, &offsets, &refs).map(|_| ()))?;
    rows.push(flops(format!("grouped fp8 {groups} experts x {per} rows [{en}, {ek}]"), t, fl));
    drop(experts);
    let experts: Vec<GpuWeight> = (0..groups)
        .map(|_| {
            Ok(GpuWeight {
                data: Tensor::randn(0f32, 0.05, (en, ek), dev)?.to_dtype(DType::BF16)?,
                scale: None,
                block: [128, 128],
            })
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&GpuWeight> = experts.iter().collect();
    let t = time(dev, 3, || ops::grouped_gemm(&x, &row_idx, &offsets, &refs).map(|_| ()))?;
    rows.push(flops(format!("grouped bf16 {groups} experts x {per} rows [{en}, {ek}]"), t, fl));
    // decode-sized grouped call: 8 experts x 1 row, weight-bound
    let offsets1: Vec<i32> = (0..=8).collect();
    let refs8: Vec<&GpuWeight> = experts.iter().take(8).collect();
    let idx8: Vec<i32> = (0..8).collect();
    let t = time(dev, 10, || ops::grouped_gemm(&x, &idx8, &offsets1, &refs8).map(|_| ()))?;
    rows.push(mem(format!("grouped bf16 8 experts x 1 row [{en}, {ek}]"), t, (8 * en * ek * 2) as f64));
    Ok(Report { copy_gbps, matmul_tflops, rows })
}

impl Report {
    pub fn print(&self) {
        println!(
            "cuda kernels: copy bandwidth {:.0} GB/s (1 GiB device copy), bf16 matmul {:.0} TFLOP/s (8192^3, cuBLAS)",
            self.copy_gbps, self.matmul_tflops
        );
        println!("{:<48} {:>10} {:>12} {:>10} {:>12}", "kernel", "time (us)", "rate", "of floor", "floor");
        for r in &self.rows {
            println!(
                "{:<48} {:>10.1} {:>7.1} {:<4} {:>10.2} {:>12}",
                r.name,
                r.seconds * 1e6,
                r.rate,
                r.unit,
                r.of_floor,
                r.floor
            );
        }
    }
}
