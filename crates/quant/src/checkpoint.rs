//! A Hugging Face checkpoint directory: `model.safetensors.index.json` + shards, or a single
//! `model.safetensors`. Shards are memory-mapped; tensors (or row/column slices of them) are
//! decoded on request, so tensor and expert parallelism can read just their part.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use moeserve_core::{Error, Result};
use safetensors::{Dtype, SafeTensors};

use crate::fp8::Fp8Block;
use crate::progress::LoadProgress;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// For ggml block-quantized tensors (GGUF), `U8`: see `ggml`.
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the shard file.
    pub bytes: Range<usize>,
    /// A GGUF tensor in a ggml block format (q8_0, q4_K, ...), stored row by row in blocks.
    pub ggml: Option<GgmlDType>,
}

/// A shard's bytes: the memory-mapped file, or tensors derived at open time (GGUF's split
/// `attn_k_b` / `attn_v_b` joined back into `kv_b_proj`).
pub(crate) enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    pub(crate) mmap: Backing,
    pub(crate) tensors: HashMap<String, TensorMeta>,
}

/// Rows of a memory-mapped 2-D tensor, converted to f32 on request.
pub struct MappedRows {
    mmap: Mmap,
    skip: usize,
    dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    elem: usize,
}

impl std::fmt::Debug for MappedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedRows({:?} [{}, {}])", self.dtype, self.rows, self.cols)
    }
}

impl MappedRows {
    /// Append row `r` as f32 to `out` (`r < rows`).
    pub fn read_row(&self, r: usize, out: &mut Vec<f32>) {
        let b = &self.mmap[self.skip + r * self.cols * self.elem..][..self.cols * self.elem];
        match self.dtype {
            Dtype::BF16 => {
                out.extend(b.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            }
            Dtype::F16 => out.extend(b.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())),
            _ => out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        }
    }
}

/// Which part of a tensor to read: a range of rows (dim 0) and, for 2-D tensors, of columns.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    pub rows: Option<Range<usize>>,
    pub cols: Option<Range<usize>>,
}

impl Slice {
    pub fn full() -> Self {
        Slice::default()
    }
    pub fn rows(r: Range<usize>) -> Self {
        Slice { rows: Some(r), cols: None }
    }
    pub fn cols(c: Range<usize>) -> Self {
        Slice { rows: None, cols: Some(c) }
    }
}

pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
    progress: LoadProgress,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({}, {} shards, {} tensors)", self.dir.display(), self.shards.len(), self.index.len())
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<(String, Vec<String>)> = if index_path.exists() {
            read_index(&index_path)?
        } else if dir.join(SINGLE_FILE).exists() {
            vec![(SINGLE_FILE.to_string(), vec![])]
        } else {
            return Err(Error::CheckpointFile {
                file: dir.to_path_buf(),
                msg: format!("no {INDEX_FILE} or {SINGLE_FILE} in this directory"),
            });
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, (fname, listed)) in files.into_iter().enumerate() {
            let shard = open_shard(&dir.join(&fname))?;
            for name in &listed {
                if !shard.tensors.contains_key(name) {
                    return Err(Error::Tensor {
                        file: shard.path.clone(),
                        tensor: name.clone(),
                        msg: format!("listed in {INDEX_FILE} but not present in this shard"),
                    });
                }
            }
            for name in shard.tensors.keys() {
                index.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        let total: u64 = shards.iter().map(|s| s.mmap.len() as u64).sum();
        let progress = LoadProgress::new(total, shards.len());
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, index, progress })
    }

    /// A checkpoint over already opened shards (GGUF files).
    pub(crate) fn from_shards(dir: &Path, shards: Vec<Shard>) -> Self {
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.tensors.keys() {
                index.insert(name.clone(), i);
            }
        }
        let total: u64 = shards.iter().map(|s| s.mmap.len() as u64).sum();
        let progress = LoadProgress::new(total, shards.len());
        Checkpoint { dir: dir.to_path_buf(), shards, index, progress }
    }

    /// A plain (bf16 / f16 / f32) 2-D tensor mapped on its own, so that only the rows that are
    /// read become resident (the embedding table: a lookup touches a few rows of it). `None` for
    /// derived or block-quantized tensors.
    pub fn map_rows(&self, name: &str) -> Result<Option<MappedRows>> {
        let (shard, meta) = self.locate(name)?;
        if meta.ggml.is_some() || !matches!(shard.mmap, Backing::Mmap(_)) || meta.shape.len() != 2 {
            return Ok(None);
        }
        let elem = match meta.dtype {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            _ => return Ok(None),
        };
        let file = File::open(&shard.path).map_err(io_err(&shard.path))?;
        let page = 1usize << 16; // a multiple of every page size in use
        let start = meta.bytes.start / page * page;
        // SAFETY: checkpoint files are treated as read-only for the process lifetime.
        let mmap = unsafe { memmap2::MmapOptions::new().offset(start as u64).len(meta.bytes.end - start).map(&file) }
            .map_err(io_err(&shard.path))?;
        self.progress.add(meta.bytes.len() as u64, &file_name(&shard.path));
        Ok(Some(MappedRows {
            mmap,
            skip: meta.bytes.start - start,
            dtype: meta.dtype,
            rows: meta.shape[0],
            cols: meta.shape[1],
            elem,
        }))
    }

    /// The stored bytes of a tensor (GGUF blocks as they are).
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let (shard, meta) = self.locate(name)?;
        self.progress.add(meta.bytes.len() as u64, &file_name(&shard.path));
        Ok(&shard.mmap[meta.bytes.clone()])
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn finish_progress(&self) {
        self.progress.finish();
    }

    fn locate(&self, name: &str) -> Result<(&Shard, &TensorMeta)> {
        let shard = self.index.get(name).map(|&i| &self.shards[i]).ok_or_else(|| {
            let hint = if self.shards.len() > 1 {
                format!(" (searched {} shards via {INDEX_FILE})", self.shards.len())
            } else {
                String::new()
            };
            Error::MissingTensor { dir: self.dir.clone(), tensor: name.to_string(), hint }
        })?;
        Ok((shard, &shard.tensors[name]))
    }

    pub fn meta(&self, name: &str) -> Result<&TensorMeta> {
        Ok(self.locate(name)?.1)
    }

    /// The file a tensor lives in (for error messages).
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.index.get(name).map(|&i| self.shards[i].path.clone()).unwrap_or_else(|| self.dir.clone())
    }

    /// Read a (slice of a) bf16/f16/f32 tensor into `dtype` on `device`.
    pub fn load(&self, name: &str, slice: &Slice, dtype: DType, device: &Device) -> Result<Tensor> {
        let (shard, meta) = self.locate(name)?;
        if let Some(q) = meta.ggml {
            // ggml blocks: dequantized by candle, then sliced
            let data = &shard.mmap[meta.bytes.clone()];
            self.progress.add(data.len() as u64, &file_name(&shard.path));
            let t = QStorage::from_data(std::borrow::Cow::Borrowed(data), &Device::Cpu, q)
                .and_then(|st| QTensor::new(st, meta.shape.as_slice()))
                .and_then(|qt| qt.dequantize(&Device::Cpu))
                .map_err(|e| tensor_err(shard, name, e))?;
            let (r, c) = slice_ranges(shard, name, &meta.shape, slice)?;
            let mut t = t.narrow(0, r.start, r.len()).map_err(|e| tensor_err(shard, name, e))?;
            if meta.shape.len() == 2 {
                t = t.narrow(1, c.start, c.len()).map_err(|e| tensor_err(shard, name, e))?;
            }
            return t.to_dtype(dtype).and_then(|t| t.to_device(device)).map_err(|e| tensor_err(shard, name, e));
        }
        let src = match meta.dtype {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            other => {
                return Err(Error::Tensor {
                    file: shard.path.clone(),
                    tensor: name.into(),
                    msg: format!("dtype {other:?} cannot be loaded as a plain tensor (FP8 weights need their weight_scale_inv)"),
                })
            }
        };
        let (bytes, shape) = self.raw_slice(shard, name, meta, slice, src.size_in_bytes())?;
        let t = Tensor::from_raw_buffer(&bytes, src, &shape, device).map_err(|e| tensor_err(shard, name, e))?;
        t.to_dtype(dtype).map_err(|e| tensor_err(shard, name, e))
    }

    /// A block-scaled FP8 weight as stored: its `[rows, cols]` E4M3 bytes (memory-mapped) and its
    /// `weight_scale_inv` `[ceil(rows / block[0]), ceil(cols / block[1])]`, both checked.
    pub fn fp8_parts(&self, name: &str, scale_name: &str, block: [usize; 2]) -> Result<(&[u8], Vec<f32>, [usize; 2])> {
        let (shard, meta) = self.locate(name)?;
        if meta.dtype != Dtype::F8_E4M3 {
            return Err(Error::Tensor {
                file: shard.path.clone(),
                tensor: name.into(),
                msg: format!("expected F8_E4M3, found {:?}", meta.dtype),
            });
        }
        let [rows, cols] = match meta.shape[..] {
            [r, c] => [r, c],
            _ => {
                return Err(Error::Tensor {
                    file: shard.path.clone(),
                    tensor: name.into(),
                    msg: format!("FP8 weight must be 2-D, found {:?}", meta.shape),
                })
            }
        };
        let want = Fp8Block::scale_dims(rows, cols, block);
        let scale = self.load(scale_name, &Slice::full(), DType::F32, &Device::Cpu)?;
        if scale.dims() != want {
            return Err(Error::Shape {
                file: self.file_of(scale_name),
                tensor: scale_name.into(),
                expected: want.to_vec(),
                found: scale.dims().to_vec(),
            });
        }
        let scale = scale.flatten_all().and_then(|s| s.to_vec1::<f32>()).map_err(|e| tensor_err(shard, scale_name, e))?;
        self.progress.add(meta.bytes.len() as u64, &file_name(&shard.path));
        Ok((&shard.mmap[meta.bytes.clone()], scale, [rows, cols]))
    }

    /// Read a (slice of a) block-scaled FP8 weight, dequantized exactly in f32
    /// (`f32(q) × scale_inv[block]`), then cast once to `dtype`.
    pub fn load_fp8(
        &self,
        name: &str,
        scale_name: &str,
        block: [usize; 2],
        slice: &Slice,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (data, scale, [rows, cols]) = self.fp8_parts(name, scale_name, block)?;
        let (shard, meta) = self.locate(name)?;
        let (r, c) = slice_ranges(shard, name, &meta.shape, slice)?;
        let w = Fp8Block { data, rows, cols, scale_inv: &scale, block };
        let shape = [r.len(), c.len()];
        let values = w.dequantize(r, c);
        let t = Tensor::from_vec(values, &shape[..], device).map_err(|e| tensor_err(shard, name, e))?;
        t.to_dtype(dtype).map_err(|e| tensor_err(shard, name, e))
    }

    /// Bytes of the requested slice (row-major) and its shape.
    fn raw_slice(
        &self,
        shard: &Shard,
        name: &str,
        meta: &TensorMeta,
        slice: &Slice,
        elem: usize,
    ) -> Result<(Vec<u8>, Vec<usize>)> {
        let data = &shard.mmap[meta.bytes.clone()];
        self.progress.add(data.len() as u64, &file_name(&shard.path));
        let (r, c) = slice_ranges(shard, name, &meta.shape, slice)?;
        let mut shape = meta.shape.clone();
        if shape.is_empty() {
            return Ok((data.to_vec(), shape));
        }
        let row_elems: usize = shape[1..].iter().product();
        shape[0] = r.len();
        if meta.shape.len() < 2 || c.len() == meta.shape[1] {
            return Ok((data[r.start * row_elems * elem..r.end * row_elems * elem].to_vec(), shape));
        }
        shape[1] = c.len();
        let inner: usize = meta.shape[2..].iter().product();
        let mut out = Vec::with_capacity(r.len() * c.len() * inner * elem);
        for row in r {
            let base = row * row_elems;
            out.extend_from_slice(&data[(base + c.start * inner) * elem..(base + c.end * inner) * elem]);
        }
        Ok((out, shape))
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn tensor_err(shard: &Shard, name: &str, e: candle_core::Error) -> Error {
    Error::Tensor { file: shard.path.clone(), tensor: name.into(), msg: e.to_string() }
}

fn slice_ranges(shard: &Shard, name: &str, shape: &[usize], slice: &Slice) -> Result<(Range<usize>, Range<usize>)> {
    let rows = shape.first().copied().unwrap_or(1);
    let cols = shape.get(1).copied().unwrap_or(1);
    let r = slice.rows.clone().unwrap_or(0..rows);
    let c = slice.cols.clone().unwrap_or(0..cols);
    if r.start > r.end || r.end > rows || c.start > c.end || c.end > cols || (slice.cols.is_some() && shape.len() < 2) {
        return Err(Error::Tensor {
            file: shard.path.clone(),
            tensor: name.into(),
            msg: format!("slice rows {r:?} cols {c:?} out of bounds for shape {shape:?}"),
        });
    }
    Ok((r, c))
}

/// `weight_map` of the index grouped by shard file, in first-seen order.
fn read_index(path: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let bad = |msg: String| Error::CheckpointFile { file: path.to_path_buf(), msg };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("missing `weight_map` object".into()))?;
    let mut files: Vec<(String, Vec<String>)> = Vec::new();
    let mut names: Vec<(&String, &serde_json::Value)> = map.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (tensor, file) in names {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!("weight_map[{tensor}] = {file}: shard names must be plain file names")));
        }
        match files.iter_mut().find(|(f, _)| f == file) {
            Some((_, list)) => list.push(tensor.clone()),
            None => files.push((file.to_string(), vec![tensor.clone()])),
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if files.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(files)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: checkpoint files are treated as read-only for the process lifetime.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let bad = |msg: String| Error::CheckpointFile { file: path.to_path_buf(), msg };
    let (n, metadata) = match SafeTensors::read_metadata(&mmap) {
        Ok(x) => x,
        Err(safetensors::SafeTensorError::MetadataIncompleteBuffer) => {
            return Err(truncation_error(path, &mmap));
        }
        Err(e) => return Err(bad(format!("invalid safetensors file: {e}"))),
    };
    let base = 8 + n;
    let mut tensors = HashMap::new();
    for (name, info) in metadata.tensors() {
        let (s, e) = info.data_offsets;
        tensors.insert(name, TensorMeta { dtype: info.dtype, shape: info.shape.clone(), bytes: base + s..base + e, ggml: None });
    }
    Ok(Shard { path: path.to_path_buf(), mmap: Backing::Mmap(mmap), tensors })
}

/// Name the first tensor whose data runs past the end of a truncated file.
fn truncation_error(path: &Path, buf: &[u8]) -> Error {
    let n = buf.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize).unwrap_or(0);
    let available = buf.len().saturating_sub(8 + n);
    let header: serde_json::Value =
        buf.get(8..8 + n).and_then(|h| serde_json::from_slice(h).ok()).unwrap_or(serde_json::Value::Null);
    let mut cut: Option<(String, usize)> = None;
    if let Some(obj) = header.as_object() {
        for (name, info) in obj {
            let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()).unwrap_or(0) as usize;
            if end > available && cut.as_ref().is_none_or(|(_, e)| end < *e) {
                cut = Some((name.clone(), end));
            }
        }
    }
    match cut {
        Some((tensor, end)) => Error::Tensor {
            file: path.to_path_buf(),
            tensor,
            msg: format!("file is truncated: tensor data ends at byte {end} but only {available} data bytes are present"),
        },
        None => Error::CheckpointFile {
            file: path.to_path_buf(),
            msg: "file size does not match its header (truncated or padded)".into(),
        },
    }
}
