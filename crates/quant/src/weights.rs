//! Prefixed weight loader over a checkpoint (mirrors the checkpoint tree: `w.pp("self_attn")`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use moeserve_core::{error::Context, Error, Result};
use moeserve_cpu::{Format, PackedMatrix};
use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, Slice};
use crate::linear::{DenseLinear, Linear};
use crate::packed::PackedLinear;
use crate::spec::{QuantSpec, TensorClass};

/// What the loader put behind the Linear seam: tensors and resident bytes per (class, format).
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub entries: BTreeMap<(&'static str, &'static str), (usize, usize)>,
}

impl LoadReport {
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|(_, b)| b).sum()
    }

    /// One line per class, e.g. `experts: q4k 1.03 GB (540 tensors)`.
    pub fn lines(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|((class, fmt), (n, bytes))| format!("{class}: {fmt} {:.3} GB ({n} tensors)", *bytes as f64 / 1e9))
            .collect()
    }
}

/// DeepSeek's FP8 checkpoints use 128×128 blocks when `weight_block_size` is absent.
pub const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

#[derive(Clone)]
pub struct Weights {
    ckpt: Arc<Checkpoint>,
    prefix: String,
    /// Compute dtype of activations and dense weights.
    pub dtype: DType,
    pub device: Device,
    fp8_block: [usize; 2],
    spec: Arc<QuantSpec>,
    report: Arc<Mutex<LoadReport>>,
}

impl Weights {
    pub fn new(ckpt: Arc<Checkpoint>, dtype: DType, device: Device, fp8_block: Option<[usize; 2]>) -> Self {
        Weights {
            ckpt,
            prefix: String::new(),
            dtype,
            device,
            fp8_block: fp8_block.unwrap_or(DEFAULT_FP8_BLOCK),
            spec: Arc::new(QuantSpec::default()),
            report: Arc::default(),
        }
    }

    /// Resident formats per weight class (default: the checkpoint's own).
    pub fn with_spec(mut self, spec: QuantSpec) -> Self {
        self.spec = Arc::new(spec);
        self
    }

    /// What has been loaded behind the Linear seam so far.
    pub fn report(&self) -> LoadReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// FP8 block shape `[rows, cols]` of the checkpoint's block-scaled weights.
    pub fn fp8_block(&self) -> [usize; 2] {
        self.fp8_block
    }

    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.ckpt
    }

    /// Descend one level of the tensor-name tree.
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.prefix = self.name(&part.to_string());
        w
    }

    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    pub fn contains(&self, leaf: &str) -> bool {
        self.ckpt.contains(&self.name(leaf))
    }

    fn check_shape(&self, name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
        if found != expected {
            return Err(Error::Shape {
                file: self.ckpt.file_of(name),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// A tensor of the expected shape in `dtype` (FP8 weights are dequantized).
    pub fn tensor_as(&self, leaf: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.tensor_slice_as(leaf, shape, &Slice::full(), dtype)
    }

    /// A tensor in the compute dtype.
    pub fn tensor(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        self.tensor_as(leaf, shape, self.dtype)
    }

    /// A slice of a tensor whose full shape must be `shape`.
    pub fn tensor_slice_as(&self, leaf: &str, shape: &[usize], slice: &Slice, dtype: DType) -> Result<Tensor> {
        let name = self.name(leaf);
        let meta = self.ckpt.meta(&name)?;
        self.check_shape(&name, &meta.shape, shape)?;
        if meta.dtype == Dtype::F8_E4M3 {
            let scale = format!("{name}_scale_inv");
            if !self.ckpt.contains(&scale) {
                return Err(Error::Tensor {
                    file: self.ckpt.file_of(&name),
                    tensor: name,
                    msg: format!("FP8 weight without its scale tensor `{scale}`"),
                });
            }
            return self.ckpt.load_fp8(&name, &scale, self.fp8_block, slice, dtype, &self.device);
        }
        self.ckpt.load(&name, slice, dtype, &self.device)
    }

    /// The projection `{leaf}.weight` of shape `[out_dim, in_dim]` behind the Linear seam, in the
    /// resident format the spec asks for its class: the checkpoint's own format by default (FP8
    /// stays FP8 at one byte per weight, bf16 stays bf16), or quantized in situ at load.
    pub fn linear(&self, leaf: &str, in_dim: usize, out_dim: usize) -> Result<Arc<dyn Linear>> {
        self.linear_part(leaf, in_dim, out_dim, &Slice::full())
    }

    /// Part of the projection `{leaf}.weight` (full shape `[out_dim, in_dim]`): a range of output
    /// rows (column-parallel) or of input columns (row-parallel). Only that part is read and kept;
    /// FP8 and ggml blocks stay in their format when the cut falls on block boundaries.
    pub fn linear_part(&self, leaf: &str, in_dim: usize, out_dim: usize, part: &Slice) -> Result<Arc<dyn Linear>> {
        let w = self.pp(leaf);
        let name = w.name("weight");
        let class = TensorClass::of(&w.prefix);
        // FP8 stays FP8 on a GPU for whole weights; a tensor-parallel part is loaded dequantized
        let whole = part.rows.is_none() && part.cols.is_none();
        let gpu_fp8 =
            if self.spec.dense_reference || !whole { None } else { crate::gpu::fp8_linear(self, &name, in_dim, out_dim)? };
        let linear: Arc<dyn Linear> = if let Some(l) = gpu_fp8 {
            l
        } else if self.spec.dense_reference || !self.device.is_cpu() {
            let t = w.tensor_slice_as("weight", &[out_dim, in_dim], part, self.dtype)?;
            Arc::new(DenseLinear::new(&name, t))
        } else {
            Arc::new(PackedLinear::new(&name, self.pack(&w, &name, class, [out_dim, in_dim], part)?))
        };
        if let Ok(mut r) = self.report.lock() {
            let e = r.entries.entry((class.name(), linear.format())).or_default();
            e.0 += 1;
            e.1 += linear.resident_bytes();
        }
        Ok(linear)
    }

    fn pack(&self, w: &Weights, name: &str, class: TensorClass, shape: [usize; 2], part: &Slice) -> Result<PackedMatrix> {
        let meta = self.ckpt.meta(name)?;
        self.check_shape(name, &meta.shape, &shape)?;
        let (rows, cols) = (part.rows.clone().unwrap_or(0..shape[0]), part.cols.clone().unwrap_or(0..shape[1]));
        if rows.end > shape[0] || cols.end > shape[1] || rows.is_empty() || cols.is_empty() {
            return Err(Error::Tensor {
                file: self.ckpt.file_of(name),
                tensor: name.into(),
                msg: format!("part rows {rows:?} cols {cols:?} of a {shape:?} weight"),
            });
        }
        let (out_dim, in_dim) = (rows.len(), cols.len());
        let values = |dtype| w.tensor_slice_as("weight", &shape, part, dtype).and_then(|t| t.flatten_all().ctx(|| name.into()));
        let f32s = || values(DType::F32).and_then(|t| t.to_vec1::<f32>().ctx(|| name.into()));
        let native = meta.ggml.and_then(|q| match q {
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            GgmlDType::Q4K => Some(Format::Q4K),
            GgmlDType::Q6K => Some(Format::Q6K),
            _ => None,
        });
        let whole_blocks = |f: Format| cols.start.is_multiple_of(f.col_block()) && cols.end.is_multiple_of(f.col_block());
        let fp8_aligned = |b: [usize; 2]| {
            let on = |x: usize, full: usize, step: usize| x.is_multiple_of(step) || x == full;
            on(rows.start, shape[0], b[0])
                && on(rows.end, shape[0], b[0])
                && on(cols.start, shape[1], b[1])
                && on(cols.end, shape[1], b[1])
        };
        let packed = match (self.spec.target(class), native, meta.ggml, meta.dtype) {
            (Some(t), ..) => PackedMatrix::from_f32(t.format(), out_dim, in_dim, &f32s()?),
            // GGUF blocks the kernels read as stored (a column cut must fall between blocks)
            (None, Some(f), ..) if whole_blocks(f) => {
                let row_bytes = f.bytes_per_row(shape[1]);
                let bytes_at = |c: usize| f.bytes_per_row(c);
                let raw = self.ckpt.raw(name)?;
                PackedMatrix::from_blocks(
                    f,
                    out_dim,
                    in_dim,
                    cut(raw, row_bytes, &rows, bytes_at(cols.start)..bytes_at(cols.end)),
                )
            }
            // other ggml block types (q4_0, q5_K, ...) and cuts inside a block: dequantized once, kept as bf16
            (None, _, Some(_), _) => PackedMatrix::from_f32(Format::Bf16, out_dim, in_dim, &f32s()?),
            (None, None, None, Dtype::F8_E4M3) if self.fp8_block[1].is_multiple_of(8) && fp8_aligned(self.fp8_block) => {
                let b = self.fp8_block;
                let (data, scale, _) = self.ckpt.fp8_parts(name, &format!("{name}_scale_inv"), b)?;
                let data = cut(data, shape[1], &rows, cols.clone());
                let scale_cols = shape[1].div_ceil(b[1]);
                let scale_rows = rows.start / b[0]..rows.end.div_ceil(b[0]);
                let scale = cut_f32(&scale, scale_cols, &scale_rows, cols.start / b[1]..cols.end.div_ceil(b[1]));
                PackedMatrix::from_fp8(out_dim, in_dim, &data, &scale, b)
            }
            (None, None, None, Dtype::BF16) => {
                let bits: Vec<u16> =
                    values(DType::BF16)?.to_vec1::<half::bf16>().ctx(|| name.into())?.iter().map(|v| v.to_bits()).collect();
                PackedMatrix::from_bf16(out_dim, in_dim, &bits)
            }
            // f32 / f16, and FP8 whose blocks the kernels cannot step through or the cut splits: exact in f32
            _ => PackedMatrix::from_f32(Format::F32, out_dim, in_dim, &f32s()?),
        };
        packed.map_err(|e| Error::Tensor { file: self.ckpt.file_of(name), tensor: name.to_string(), msg: e.0 })
    }
}

/// Rows `rows` and, of each, bytes `bytes` of a row-major buffer with `row_len` bytes per row.
fn cut(data: &[u8], row_len: usize, rows: &std::ops::Range<usize>, bytes: std::ops::Range<usize>) -> Vec<u8> {
    rows.clone().flat_map(|r| &data[r * row_len + bytes.start..r * row_len + bytes.end]).copied().collect()
}

fn cut_f32(data: &[f32], row_len: usize, rows: &std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Vec<f32> {
    rows.clone().flat_map(|r| &data[r * row_len + cols.start..r * row_len + cols.end]).copied().collect()
}
