//! NCCL communicator (feature `cuda`): `moeserve_core::Communicator` over the GPUs of a group,
//! one rank per device, through cudarc's NCCL bindings (libnccl is loaded at run time).
//!
//! The seam's buffers are host f32 slices: each collective copies them to the rank's device,
//! runs the NCCL call on the rank's stream and copies the result back. Variable-length
//! collectives (all-gather, all-to-all, broadcast) first exchange the lengths.
//! Multi-node groups get node 0's NCCL id through `moeserve_core::rendezvous`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use moeserve_core::comm::part_range;
use moeserve_core::rendezvous::Rendezvous;
use moeserve_core::{Communicator, Error, Result};

fn err(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |e| Error::Input(format!("nccl {what}: {e}"))
}

fn dbg<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// `Comm` holds a raw NCCL handle.
struct CommCell(Comm);
// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; `NcclComm` only touches it under its mutex.
unsafe impl Send for CommCell {}

pub struct NcclComm {
    comm: Mutex<CommCell>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    aborted: AtomicBool,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.world)
    }
}

/// The NCCL id as the bytes the rendezvous carries.
fn id_bytes(id: &Id) -> Vec<u8> {
    id.internal().iter().map(|&c| c as u8).collect()
}

fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
    let mut internal = [0 as std::ffi::c_char; 128];
    if bytes.len() != internal.len() {
        return Err(Error::Input(format!("nccl id of {} bytes, expected 128", bytes.len())));
    }
    for (d, &b) in internal.iter_mut().zip(bytes) {
        *d = b as std::ffi::c_char;
    }
    Ok(Id::uninit(internal))
}

impl NcclComm {
    /// A fresh group id (node 0 creates it; the other ranks receive it). The first NCCL call
    /// loads libnccl; a missing library is an error, not a panic.
    pub fn new_id() -> Result<Vec<u8>> {
        std::panic::catch_unwind(Id::new)
            .map_err(|_| Error::Input("nccl: cannot load libnccl.so.2 (install NCCL or put it on LD_LIBRARY_PATH)".into()))?
            .map(|id| id_bytes(&id))
            .map_err(|e| err("unique id")(dbg(e)))
    }

    /// The id of a group spanning several nodes: node 0 creates it and hands it out over TCP.
    pub fn shared_id(rdv: &Rendezvous) -> Result<Vec<u8>> {
        let mine = if rdv.node_rank == 0 { Some(Self::new_id()?) } else { None };
        rdv.share(mine.as_deref())
    }

    /// Rank `rank` of `world` on CUDA device `ordinal`; every rank passes the same `id`. Ranks
    /// of one process call this from their own threads (NCCL's init blocks until all have joined).
    pub fn new(ordinal: usize, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| err("device")(dbg(e)))?;
        let stream = ctx.new_stream().map_err(|e| err("stream")(dbg(e)))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id_from_bytes(id)?).map_err(|e| err("init")(dbg(e)))?;
        Ok(NcclComm { comm: Mutex::new(CommCell(comm)), stream, rank, world, aborted: AtomicBool::new(false) })
    }

    fn check(&self) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(Error::Input("parallel group aborted: another rank failed".into()));
        }
        Ok(())
    }

    fn up<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(v).map_err(|e| err("copy to device")(dbg(e)))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| err("alloc")(dbg(e)))
    }

    fn down(&self, d: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut v = self.stream.clone_dtoh(d).map_err(|e| err("copy to host")(dbg(e)))?;
        v.truncate(n);
        Ok(v)
    }

    fn with_comm<R>(&self, f: impl FnOnce(&Comm) -> Result<R>) -> Result<R> {
        self.check()?;
        let cell = self.comm.lock().map_err(|_| Error::Input("nccl communicator poisoned".into()))?;
        let r = f(&cell.0);
        if r.is_err() {
            self.aborted.store(true, Ordering::Release);
        }
        r
    }

    /// `vals` of every rank (the same count everywhere), concatenated in rank order.
    fn gather_counts(&self, vals: &[usize]) -> Result<Vec<usize>> {
        let send = self.up(&vals.iter().map(|&v| v as u64).collect::<Vec<_>>())?;
        let mut recv = self.stream.alloc_zeros::<u64>(vals.len() * self.world).map_err(|e| err("alloc")(dbg(e)))?;
        self.with_comm(|c| c.all_gather(&send, &mut recv).map(drop).map_err(|e| err("all_gather")(dbg(e))))?;
        let v = self.stream.clone_dtoh(&recv).map_err(|e| err("copy to host")(dbg(e)))?;
        Ok(v.into_iter().map(|x| x as usize).collect())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut d = self.up(buf)?;
        self.with_comm(|c| c.all_reduce_in_place(&mut d, &ReduceOp::Sum).map(drop).map_err(|e| err("all_reduce")(dbg(e))))?;
        buf.copy_from_slice(&self.down(&d, buf.len())?);
        Ok(())
    }

    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>> {
        let lens = self.gather_counts(&[buf.len()])?;
        let max = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = buf.to_vec();
        padded.resize(max, 0.0);
        let send = self.up(&padded)?;
        let mut recv = self.zeros(max * self.world)?;
        self.with_comm(|c| c.all_gather(&send, &mut recv).map(drop).map_err(|e| err("all_gather")(dbg(e))))?;
        let all = self.down(&recv, max * self.world)?;
        Ok(lens.iter().enumerate().map(|(r, &n)| all[r * max..r * max + n].to_vec()).collect())
    }

    fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>> {
        let step = buf.len().div_ceil(self.world).max(1);
        let mut padded = buf.to_vec();
        padded.resize(step * self.world, 0.0);
        let send = self.up(&padded)?;
        let mut recv = self.zeros(step)?;
        self.with_comm(|c| {
            c.reduce_scatter(&send, &mut recv, &ReduceOp::Sum).map(drop).map_err(|e| err("reduce_scatter")(dbg(e)))
        })?;
        self.down(&recv, part_range(buf.len(), self.world, self.rank).len())
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        if send.len() != self.world {
            return Err(Error::Input(format!("rank {}: {} send buffers for {} ranks", self.rank, send.len(), self.world)));
        }
        // sizes[src * world + dst]
        let sizes = self.gather_counts(&send.iter().map(Vec::len).collect::<Vec<_>>())?;
        let outgoing: Vec<CudaSlice<f32>> =
            send.iter().map(|s| self.up(if s.is_empty() { &[0.0] } else { s })).collect::<Result<_>>()?;
        let mut incoming: Vec<CudaSlice<f32>> =
            (0..self.world).map(|src| self.zeros(sizes[src * self.world + self.rank])).collect::<Result<_>>()?;
        let world = self.world;
        let rank = self.rank;
        self.with_comm(|c| {
            let sends: Vec<_> = outgoing.iter().map(|s| s.as_view()).collect();
            let recvs: Vec<_> = incoming.iter_mut().map(|s| s.as_view_mut()).collect();
            // one NCCL group: every send and receive of the exchange in flight together
            let mut g = c.group();
            for (peer, v) in sends.into_iter().enumerate() {
                if !send[peer].is_empty() {
                    g.send(v, peer as i32).map_err(|e| err("send")(dbg(e)))?;
                }
            }
            for (peer, v) in recvs.into_iter().enumerate() {
                if sizes[peer * world + rank] > 0 {
                    g.recv(v, peer as i32).map_err(|e| err("recv")(dbg(e)))?;
                }
            }
            Ok(())
        })?;
        incoming.iter().enumerate().map(|(src, d)| self.down(d, sizes[src * self.world + self.rank])).collect()
    }

    fn broadcast(&self, buf: &mut Vec<f32>, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Input(format!("broadcast root {root} in a group of {}", self.world)));
        }
        let n = self.gather_counts(&[buf.len()])?[root];
        let mut d = if self.rank == root { self.up(buf)? } else { self.zeros(n)? };
        self.with_comm(|c| c.broadcast_in_place(&mut d, root as i32).map(drop).map_err(|e| err("broadcast")(dbg(e))))?;
        *buf = self.down(&d, n)?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }
}
