//! The latent KV cache seam. Per token and layer MLA stores one row
//! `[kv_lora_rank normalized latent | qk_rope_head_dim rotated key]`; the engine may page it.

use candle_core::{DType, Device, Tensor};
use moeserve_core::{error::Context, Error, KvLayout, Result};

/// Storage for one sequence's latent rows, all layers. `Send`: a CPU step runs on a thread of
/// the kernels' pool (`moeserve_cpu::on_pool`).
pub trait LatentKv: Send {
    /// Tokens committed (positions `0..seq_len` are valid in every layer).
    fn seq_len(&self) -> usize;
    /// Write `rows: [n, row_dim]` for positions `start..start + n` of `layer`.
    fn write(&mut self, layer: usize, start: usize, rows: &Tensor) -> Result<()>;
    /// Rows `0..len` of `layer` as `[len, row_dim]`.
    fn read(&self, layer: usize, len: usize) -> Result<Tensor>;
    /// Commit (or roll back to) `len` tokens.
    fn set_seq_len(&mut self, len: usize) -> Result<()>;
    /// A view for another rank of a parallel group: the same rows (every rank computes the same
    /// latent rows, so in-process ranks share one copy), with its own length bookkeeping.
    fn fork<'o>(&self) -> Box<dyn LatentKv + Send + 'o>
    where
        Self: 'o;
    /// The pool rows of `layer` when the storage is paged, so that a device kernel reads the
    /// pages in place instead of a gathered copy (`read`).
    fn paged(&self, _layer: usize) -> Option<crate::device_ops::PagedRows<'_>> {
        None
    }
}

/// One growable contiguous buffer per layer.
pub struct ContiguousLatentCache {
    layout: KvLayout,
    dtype: DType,
    device: Device,
    layers: Vec<Option<Tensor>>,
    capacity: usize,
    len: usize,
    /// Highest position written in the current step (all layers write the same range).
    written: usize,
}

impl ContiguousLatentCache {
    pub fn new(layout: KvLayout, dtype: DType, device: Device) -> Self {
        ContiguousLatentCache { layout, dtype, device, layers: vec![None; layout.num_layers], capacity: 0, len: 0, written: 0 }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|t| t.elem_count() * self.dtype.size_in_bytes()).sum()
    }

    fn grow(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let cap = needed.max(self.capacity * 2).max(64);
        for slot in self.layers.iter_mut() {
            let fresh = Tensor::zeros((cap, self.layout.row_dim()), self.dtype, &self.device).ctx(|| "kv cache alloc".into())?;
            if let Some(old) = slot {
                fresh.slice_set(old, 0, 0).ctx(|| "kv cache grow".into())?;
            }
            *slot = Some(fresh);
        }
        self.capacity = cap;
        Ok(())
    }
}

impl LatentKv for ContiguousLatentCache {
    fn seq_len(&self) -> usize {
        self.len
    }

    fn write(&mut self, layer: usize, start: usize, rows: &Tensor) -> Result<()> {
        if layer >= self.layout.num_layers {
            return Err(Error::Cache(format!("layer {layer} out of range ({} layers)", self.layout.num_layers)));
        }
        let (n, d) = rows.dims2().ctx(|| "kv rows".into())?;
        if d != self.layout.row_dim() {
            return Err(Error::Cache(format!("row width {d}, layout expects {}", self.layout.row_dim())));
        }
        if start > self.len {
            return Err(Error::Cache(format!("write at {start} leaves a gap after {} cached tokens", self.len)));
        }
        self.grow(start + n)?;
        let buf = self.layers[layer].as_ref().ok_or_else(|| Error::Cache("unallocated layer".into()))?;
        let rows = rows.to_dtype(self.dtype).ctx(|| "kv rows dtype".into())?;
        buf.slice_set(&rows, 0, start).ctx(|| format!("kv write layer {layer}"))?;
        self.written = self.written.max(start + n);
        Ok(())
    }

    fn read(&self, layer: usize, len: usize) -> Result<Tensor> {
        if len > self.capacity || len > self.len.max(self.written) {
            return Err(Error::Cache(format!("read of {len} rows, only {} written", self.len.max(self.written))));
        }
        let buf = self.layers.get(layer).and_then(Option::as_ref).ok_or_else(|| Error::Cache(format!("layer {layer} empty")))?;
        buf.narrow(0, 0, len).ctx(|| "kv read".into())
    }

    fn set_seq_len(&mut self, len: usize) -> Result<()> {
        if len > self.len.max(self.written) {
            return Err(Error::Cache(format!("commit of {len} tokens, only {} written", self.len.max(self.written))));
        }
        self.len = len;
        self.written = len;
        Ok(())
    }

    fn fork<'o>(&self) -> Box<dyn LatentKv + Send + 'o>
    where
        Self: 'o,
    {
        Box::new(ContiguousLatentCache {
            layout: self.layout,
            dtype: self.dtype,
            device: self.device.clone(),
            layers: self.layers.clone(),
            capacity: self.capacity,
            len: self.len,
            written: self.written,
        })
    }
}
