//! The whole DeepSeek V2/V3 model: embedding, decoder blocks, final norm, lm_head, MTP head.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moeserve_core::{error::Context, DeepSeekConfig, Error, KvLayout, Result};
use moeserve_quant::{Checkpoint, Linear, LoadReport, QuantSpec, Slice, Weights};

use crate::batch::ForwardBatch;
use crate::cache::{ContiguousLatentCache, LatentKv};
use crate::layer::DecoderLayer;
use crate::mtp::Mtp;
use crate::norm::RmsNorm;
use crate::parallel::Parallel;
use crate::rope::Rope;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype: F32 or BF16 on CPU.
    pub dtype: DType,
    pub device: Device,
    /// Load the MTP module when the checkpoint has one.
    pub load_mtp: bool,
    /// Router precision; F32 always in practice (see `RouterConfig::dtype`).
    pub router_dtype: DType,
    /// Resident weight formats per class (`--quant`); default: the checkpoint's own.
    pub quant: QuantSpec,
    /// This rank's place in a tensor/expert-parallel group (default: the whole model).
    pub parallel: Arc<Parallel>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            load_mtp: true,
            router_dtype: DType::F32,
            quant: QuantSpec::default(),
            parallel: Arc::default(),
        }
    }
}

/// Hand the load-time temporaries (f32 copies, quantization buffers) that the allocator keeps
/// back to the operating system, so resident memory after loading is the model's own; then keep
/// what the steps free. A step allocates and frees the same buffers every time (activations,
/// logits, expert outputs): glibc mapped the larger ones fresh with `mmap` and returned freed
/// heap tops to the kernel, so every step paid page faults and page zeroing for them (about 5 %
/// of a prefill). Fixed thresholds keep allocations under 32 MiB on the heap and freed memory in
/// the process. (Set only now: during loading they would mix the weights with the temporaries
/// on the heap, and fragment it.)
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim returns free heap pages to the kernel, mallopt changes allocator
    // parameters; both take the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// This rank's rows of a vocab-parallel head (`ceil(vocab / tp)` each, the last may be shorter).
pub(crate) fn vocab_part(vocab: usize, par: &Parallel) -> std::ops::Range<usize> {
    let (i, n) = par.tp();
    moeserve_core::comm::part_range(vocab, n, i)
}

/// The token embedding table: a tensor, or (CPU, untied) rows read from the memory-mapped
/// checkpoint, so that it does not count in resident memory (R1's table is 1.85 GB in bf16).
#[derive(Debug)]
enum Embedding {
    Tensor(Tensor),
    Mapped(moeserve_quant::MappedRows),
}

impl Embedding {
    fn resident_bytes(&self) -> usize {
        match self {
            Embedding::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Mapped(_) => 0,
        }
    }
}

#[derive(Debug)]
pub struct DeepSeekModel {
    pub cfg: DeepSeekConfig,
    /// [vocab, hidden]
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Arc<dyn Linear>,
    rope: Rope,
    mtp: Option<Mtp>,
    dtype: DType,
    device: Device,
    load_report: LoadReport,
    par: Arc<Parallel>,
}

impl DeepSeekModel {
    /// Load `config.json` and the checkpoint in `dir`.
    /// Load a Hugging Face directory (`config.json` + safetensors) or a llama.cpp GGUF file.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let (cfg, ckpt) = if moeserve_quant::gguf::is_gguf(dir) {
            let (ckpt, cfg) = moeserve_quant::gguf::open(dir)?;
            (cfg, Arc::new(ckpt))
        } else {
            (DeepSeekConfig::from_file(&dir.join("config.json"))?, Arc::new(Checkpoint::open(dir)?))
        };
        let model = Self::from_checkpoint(cfg, ckpt.clone(), opts);
        ckpt.finish_progress();
        drop(ckpt);
        release_freed_memory();
        model
    }

    pub fn from_checkpoint(cfg: DeepSeekConfig, ckpt: Arc<Checkpoint>, opts: &LoadOptions) -> Result<Self> {
        if !matches!(opts.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Input(format!("unsupported compute dtype {:?} (f32, bf16, f16)", opts.dtype)));
        }
        let block = cfg.quantization_config.as_ref().and_then(|q| q.weight_block_size);
        let root = Weights::new(ckpt, opts.dtype, opts.device.clone(), block).with_spec(opts.quant.clone());
        let m = root.pp("model");
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        // untied embedding tables stay memory-mapped on the CPU: only looked-up rows become resident
        let mapped = match (cfg.tie_word_embeddings, opts.device.is_cpu()) {
            (false, true) => root.checkpoint().map_rows("model.embed_tokens.weight")?,
            _ => None,
        };
        let embed = match mapped {
            Some(rows) if [rows.rows, rows.cols] == [v, d] => Embedding::Mapped(rows),
            _ => Embedding::Tensor(m.tensor("embed_tokens.weight", &[v, d])?),
        };
        let par = &opts.parallel;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&m.pp("layers").pp(i), &cfg, cfg.is_moe_layer(i), opts.router_dtype, par))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&m.pp("norm"), d, cfg.rms_norm_eps)?;
        let lm_head: Arc<dyn Linear> = if cfg.tie_word_embeddings {
            let rows = vocab_part(v, par);
            let t = m.tensor_slice_as("embed_tokens.weight", &[v, d], &Slice::rows(rows), opts.dtype)?;
            Arc::new(moeserve_quant::DenseLinear::new("model.embed_tokens.weight", t))
        } else {
            root.linear_part("lm_head", d, v, &Slice::rows(vocab_part(v, par)))?
        };
        let mtp_prefix = m.pp("layers").pp(cfg.mtp_layer_index());
        let mtp = if opts.load_mtp && cfg.has_mtp() && mtp_prefix.contains("eh_proj.weight") {
            Some(Mtp::load(&mtp_prefix, &cfg, opts.router_dtype, par)?)
        } else {
            None
        };
        let load_report = root.report();
        Ok(DeepSeekModel {
            load_report,
            rope: Rope::new(&cfg),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            mtp,
            dtype: opts.dtype,
            device: opts.device.clone(),
            par: par.clone(),
        })
    }

    /// This rank's place in its parallel group.
    pub fn parallel(&self) -> &Arc<Parallel> {
        &self.par
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn mtp(&self) -> Option<&Mtp> {
        self.mtp.as_ref()
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.cfg.kv_layout()
    }

    /// A fresh contiguous cache for one sequence of the main model.
    pub fn new_cache(&self) -> ContiguousLatentCache {
        ContiguousLatentCache::new(self.kv_layout(), self.dtype, self.device.clone())
    }

    /// `[n, hidden]` embeddings of `tokens`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!("token id {bad} out of range (vocab_size {})", self.cfg.vocab_size)));
        }
        match &self.embed {
            Embedding::Tensor(t) => {
                let ids = Tensor::from_slice(tokens, tokens.len(), &self.device).ctx(|| "token ids".into())?;
                t.index_select(&ids, 0).ctx(|| "embedding".into())
            }
            Embedding::Mapped(rows) => {
                let mut v = Vec::with_capacity(tokens.len() * rows.cols);
                for &t in tokens {
                    rows.read_row(t as usize, &mut v);
                }
                Tensor::from_vec(v, (tokens.len(), rows.cols), &self.device)
                    .and_then(|e| e.to_dtype(self.dtype))
                    .ctx(|| "embedding".into())
            }
        }
    }

    pub(crate) fn check_batch(&self, batch: &ForwardBatch, kv: &[&mut dyn LatentKv]) -> Result<()> {
        if batch.chunks.len() != kv.len() {
            return Err(Error::Input(format!("{} chunks but {} caches", batch.chunks.len(), kv.len())));
        }
        let total: usize = batch.chunks.iter().map(|c| c.len).sum();
        if total != batch.tokens.len() || batch.chunks.iter().any(|c| c.len == 0) {
            return Err(Error::Input(format!(
                "chunks cover {total} tokens, batch has {} (empty chunks are not allowed)",
                batch.tokens.len()
            )));
        }
        for (c, cache) in batch.chunks.iter().zip(kv) {
            if cache.seq_len() != c.start_pos {
                return Err(Error::Cache(format!(
                    "chunk starts at {} but the cache holds {} tokens",
                    c.start_pos,
                    cache.seq_len()
                )));
            }
            if c.start_pos + c.len > self.cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "position {} exceeds max_position_embeddings {}",
                    c.start_pos + c.len,
                    self.cfg.max_position_embeddings
                )));
            }
        }
        Ok(())
    }

    /// Run the decoder over `batch`; returns the post-final-norm hidden states `[n, hidden]`
    /// (the lm_head input, and the MTP module's hidden input). Caches advance by each chunk.
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut [&mut dyn LatentKv]) -> Result<Tensor> {
        self.check_batch(batch, kv)?;
        let rope = self.rope.tables(&batch.positions(), &self.device)?;
        let mut h = self.embed(&batch.tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, batch, &rope, kv, i)?;
        }
        for (c, cache) in batch.chunks.iter().zip(kv.iter_mut()) {
            cache.set_seq_len(c.start_pos + c.len)?;
        }
        moeserve_cpu::prefetch::next(self.lm_head.packed());
        self.norm.forward(&h)
    }

    /// Float32 logits `[n, vocab]` from post-norm hidden states (vocab parts gathered).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let _p = moeserve_core::profile::span("lm_head");
        let local = self.lm_head.forward(hidden)?.to_dtype(DType::F32).ctx(|| "logits".into())?;
        self.par.gather_columns(&local)
    }

    /// One-line summary of the loaded model (for logs and reports).
    /// Formats and resident bytes of every weight behind the Linear seam.
    pub fn load_report(&self) -> &LoadReport {
        &self.load_report
    }

    /// Resident bytes of all weights (projections, embedding, norms and routers are counted by
    /// the projections plus the embedding table; the rest is negligible).
    pub fn weight_bytes(&self) -> usize {
        self.load_report.total_bytes() + self.embed.resident_bytes()
    }

    /// Weight bytes one decoded token reads (attention in absorbed form, the dense MLPs, router,
    /// `top_k` experts and the shared experts of each MoE layer, lm_head, one embedding row):
    /// the numerator of the decode roofline.
    pub fn active_bytes_per_token(&self) -> usize {
        let row = self.cfg.hidden_size * 2;
        self.layers.iter().map(DecoderLayer::active_bytes).sum::<usize>() + self.lm_head.resident_bytes() + row
    }

    pub fn describe(&self) -> String {
        format!(
            "{} layers ({} MoE), hidden {}, {} heads, vocab {}, lm_head {}, mtp {}",
            self.layers.len(),
            (0..self.layers.len()).filter(|&i| self.cfg.is_moe_layer(i)).count(),
            self.cfg.hidden_size,
            self.cfg.num_attention_heads,
            self.cfg.vocab_size,
            self.lm_head.format(),
            if self.mtp.is_some() { "yes" } else { "no" }
        )
    }
}
