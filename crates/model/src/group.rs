//! A model split over the ranks of an in-process tensor/expert-parallel group: one
//! `DeepSeekModel` per rank, each holding only its part of the weights, run in lock-step (SPMD).
//!
//! Every call runs the same method on every rank: rank 0 on the calling thread, the others on
//! scoped threads, each with a fork of the caller's latent caches. Rank 0's result is returned;
//! all ranks compute the same one. A rank that fails aborts the group's collectives, so the
//! others return errors instead of waiting, and the group is reset for the next call.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use moeserve_core::{Communicator, DeepSeekConfig, Error, Result, ThreadGroup};
use moeserve_quant::Checkpoint;

use crate::batch::ForwardBatch;
use crate::cache::LatentKv;
use crate::model::{DeepSeekModel, LoadOptions};
use crate::parallel::Parallel;

#[derive(Debug)]
pub struct ModelGroup {
    ranks: Vec<DeepSeekModel>,
    group: Option<ThreadGroup>,
}

impl From<DeepSeekModel> for ModelGroup {
    fn from(model: DeepSeekModel) -> Self {
        ModelGroup { ranks: vec![model], group: None }
    }
}

impl ModelGroup {
    /// Load `dir` split over `max(tp, ep)` ranks (see `parallel` for the layout); each rank
    /// reads only its own part of the checkpoint. `tp = ep = 1` is the plain model. The ranks
    /// are threads of this process talking through an in-process `ThreadGroup`.
    pub fn load(dir: &Path, opts: &LoadOptions, tp: usize, ep: usize) -> Result<Self> {
        let world = Parallel::check_sizes(tp, ep)?;
        if world == 1 {
            return DeepSeekModel::load(dir, opts).map(Self::from);
        }
        let group = ThreadGroup::new(world);
        let comms = group.comms();
        let mut g = Self::load_with(dir, tp, ep, |rank| {
            let comm: Arc<dyn Communicator> = Arc::new(comms[rank].clone());
            Ok((comm, opts.clone()))
        })?;
        g.group = Some(group);
        Ok(g)
    }

    /// Like `load`, with each rank's communicator and load options (its device) made on that
    /// rank's own thread by `rank_setup(rank)`: NCCL communicators are created this way.
    pub fn load_with(
        dir: &Path,
        tp: usize,
        ep: usize,
        rank_setup: impl Fn(usize) -> Result<(Arc<dyn Communicator>, LoadOptions)> + Sync,
    ) -> Result<Self> {
        let world = Parallel::check_sizes(tp, ep)?;
        if moeserve_quant::gguf::is_gguf(dir) {
            return Err(Error::Input("tensor/expert parallelism needs a safetensors checkpoint directory, not GGUF".into()));
        }
        let cfg = DeepSeekConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Arc::new(Checkpoint::open(dir)?);
        let rank_setup = &rank_setup;
        let ranks = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (cfg, ckpt) = (cfg.clone(), ckpt.clone());
                    s.spawn(move || -> Result<DeepSeekModel> {
                        let (comm, opts) = rank_setup(rank)?;
                        let parallel = Arc::new(Parallel::new(comm, tp, ep)?);
                        DeepSeekModel::from_checkpoint(cfg, ckpt, &LoadOptions { parallel, ..opts })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::Input("a rank panicked while loading".into()))))
                .collect::<Result<Vec<_>>>()
        })?;
        ckpt.finish_progress();
        Ok(ModelGroup { ranks, group: None })
    }

    /// Rank 0's model: the config, dtype, device and MTP presence of the whole group.
    pub fn lead(&self) -> &DeepSeekModel {
        &self.ranks[0]
    }

    pub fn ranks(&self) -> &[DeepSeekModel] {
        &self.ranks
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Resident weight bytes of every rank.
    pub fn weight_bytes(&self) -> usize {
        self.ranks.iter().map(DeepSeekModel::weight_bytes).sum()
    }

    /// Run `f`, several of the group's calls (a step's forward, logits and sampling), on the CPU
    /// kernels' pool in one go: one hand-over to the pool and back per step, not one per call,
    /// and the pool's threads kept awake from the forward to the logits (`moeserve_cpu::on_pool`).
    /// A tensor-parallel group or a GPU model runs `f` where it is called.
    pub fn step<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.ranks[..] {
            [lead] if lead.device().is_cpu() => moeserve_cpu::on_pool(f),
            _ => f(),
        }
    }

    /// Run `f` on every rank with its view of `kv`; rank 0's result.
    pub fn spmd<'o, R: Send>(
        &self,
        kv_in: &mut [&mut (dyn LatentKv + 'o)],
        f: impl Fn(&DeepSeekModel, &mut [&mut dyn LatentKv]) -> Result<R> + Sync,
    ) -> Result<R> {
        let forks: Vec<Vec<Box<dyn LatentKv + Send + 'o>>> =
            self.ranks[1..].iter().map(|_| kv_in.iter().map(|k| k.fork()).collect()).collect();
        let mut kv: Vec<&mut dyn LatentKv> = kv_in.iter_mut().map(|k| &mut **k as &mut dyn LatentKv).collect();
        if self.ranks.len() == 1 {
            let lead = &self.ranks[0];
            if lead.device().is_cpu() {
                return moeserve_cpu::on_pool(|| f(lead, &mut kv));
            }
            return f(lead, &mut kv);
        }
        let abort_on_error = |model: &DeepSeekModel, r: Result<R>| {
            if r.is_err() {
                model.parallel().comm().abort();
            }
            r
        };
        let (lead, others) = std::thread::scope(|s| {
            let handles: Vec<_> = self.ranks[1..]
                .iter()
                .zip(forks)
                .map(|(model, mut views)| {
                    let f = &f;
                    s.spawn(move || {
                        let mut kv: Vec<&mut dyn LatentKv> = views.iter_mut().map(|v| v.as_mut() as &mut dyn LatentKv).collect();
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(model, &mut kv)))
                            .unwrap_or_else(|_| Err(Error::Input(format!("rank {} panicked", model.parallel().rank()))));
                        abort_on_error(model, r).map(drop)
                    })
                })
                .collect();
            let lead = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&self.ranks[0], &mut kv)))
                .unwrap_or_else(|_| Err(Error::Input("rank 0 panicked".into())));
            let lead = abort_on_error(&self.ranks[0], lead);
            let others: Vec<Result<()>> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::Input("a rank thread panicked".into()))))
                .collect();
            (lead, others)
        });
        // an in-process group can be reset once every rank has returned
        if let (Some(group), true) = (&self.group, lead.is_err() || others.iter().any(Result::is_err)) {
            group.reset();
        }
        // the first error that is not only the echo of another rank's abort
        let first_err = others.into_iter().filter_map(Result::err).find(|e| !e.to_string().contains("aborted"));
        match (lead, first_err) {
            (Ok(_), Some(e)) => Err(e),
            (Err(e), Some(other)) if e.to_string().contains("aborted") => Err(other),
            (r, _) => r,
        }
    }

    /// `DeepSeekModel::forward` on every rank.
    pub fn forward(&self, batch: &ForwardBatch, kv: &mut [&mut dyn LatentKv]) -> Result<Tensor> {
        self.spmd(kv, |m, kv| m.forward(batch, kv))
    }

    /// `DeepSeekModel::logits` on every rank (the vocab parts are gathered).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.spmd(&mut [], |m, _| m.logits(hidden))
    }

    /// `Mtp::forward` on every rank.
    pub fn mtp_forward(&self, batch: &ForwardBatch, hidden: &Tensor, kv: &mut [&mut dyn LatentKv]) -> Result<Tensor> {
        self.spmd(kv, |m, kv| m.mtp().ok_or_else(no_mtp)?.forward(m, batch, hidden, kv))
    }

    /// `Mtp::head_logits` on every rank.
    pub fn mtp_head_logits(&self, normed: &Tensor) -> Result<Tensor> {
        self.spmd(&mut [], |m, _| m.mtp().ok_or_else(no_mtp)?.head_logits(normed))
    }
}

fn no_mtp() -> Error {
    Error::Input("the model has no MTP layer loaded".into())
}
