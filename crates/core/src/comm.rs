//! Collective communication between the ranks of a tensor/expert-parallel group.
//!
//! `Communicator` is the seam: the model calls collectives on host f32 buffers, and an
//! implementation moves them. `ThreadComm` is the in-process one (one thread per rank), used by
//! the tests and by CPU experiments; the NCCL one lives behind the `cuda` feature.
//!
//! Every rank must call the same collectives in the same order (SPMD). A rank that fails calls
//! `abort`, and every other rank's pending or next collective returns an error instead of waiting
//! forever; a waiting rank also gives up after `ThreadGroup::timeout`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::{Error, Result};

pub trait Communicator: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks, in place; every rank gets the sum.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's buffer, in rank order (lengths may differ between ranks).
    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>>;
    /// Sum over ranks of `buf` (same length everywhere), of which this rank keeps part `rank`
    /// when the sum is cut into `world_size` parts of `ceil(len / world_size)` elements.
    fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>>;
    /// `send[r]` goes to rank r; returns what every rank sent to this one, in rank order.
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>>;
    /// After the call every rank's `buf` equals `root`'s.
    fn broadcast(&self, buf: &mut Vec<f32>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Make every pending and future collective of the group fail (a rank hit an error).
    fn abort(&self);
}

/// Part `i` of `len` elements cut into `parts` pieces of `ceil(len / parts)` (the last ones may
/// be shorter or empty): the layout of `reduce_scatter_sum` and of vocab-parallel heads.
pub fn part_range(len: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    let step = len.div_ceil(parts.max(1));
    (i * step).min(len)..((i + 1) * step).min(len)
}

/// The single-rank communicator: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoloComm;

impl Communicator for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(vec![buf.to_vec()])
    }
    fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        Ok(send)
    }
    fn broadcast(&self, _: &mut Vec<f32>, _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self) {}
}

/// State shared by the ranks of one in-process group.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    size: usize,
    timeout: Duration,
}

#[derive(Debug)]
struct State {
    /// Ranks arrived at the current barrier phase.
    arrived: usize,
    /// Incremented each time a barrier phase completes.
    generation: u64,
    aborted: bool,
    /// `slots[src][dst]`: what rank src deposited for rank dst in the current collective.
    slots: Vec<Vec<Vec<f32>>>,
}

/// The in-process group: `ThreadGroup::new(n).comms()` gives one communicator per rank thread.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    shared: Arc<Shared>,
}

impl ThreadGroup {
    pub fn new(size: usize) -> Self {
        Self::with_timeout(size, Duration::from_secs(600))
    }

    /// A rank that waits longer than `timeout` at a collective fails (and aborts the group).
    pub fn with_timeout(size: usize, timeout: Duration) -> Self {
        let size = size.max(1);
        let state = State { arrived: 0, generation: 0, aborted: false, slots: vec![vec![Vec::new(); size]; size] };
        ThreadGroup { shared: Arc::new(Shared { state: Mutex::new(state), cv: Condvar::new(), size, timeout }) }
    }

    pub fn comms(&self) -> Vec<ThreadComm> {
        (0..self.shared.size).map(|rank| ThreadComm { rank, shared: self.shared.clone() }).collect()
    }

    /// Clear an abort once every rank has left its collectives (the caller joined them all).
    pub fn reset(&self) {
        let mut s = lock(&self.shared);
        s.aborted = false;
        s.arrived = 0;
        s.slots.iter_mut().flatten().for_each(Vec::clear);
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // a rank that panicked holding the lock leaves consistent data: every write is a whole slot
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

fn aborted() -> Error {
    Error::Input("parallel group aborted: another rank failed".into())
}

/// One rank of a `ThreadGroup`.
#[derive(Debug, Clone)]
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// Wait until every rank has arrived at this phase.
    fn sync<'a>(&'a self, mut s: MutexGuard<'a, State>) -> Result<MutexGuard<'a, State>> {
        if s.aborted {
            return Err(aborted());
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.shared.size {
            s.arrived = 0;
            s.generation += 1;
            self.shared.cv.notify_all();
            return Ok(s);
        }
        let deadline = std::time::Instant::now() + self.shared.timeout;
        while s.generation == generation && !s.aborted {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.aborted = true;
                self.shared.cv.notify_all();
                return Err(Error::Input(format!(
                    "rank {}: collective timed out after {:?} waiting for the other ranks",
                    self.rank, self.shared.timeout
                )));
            }
            s = self.shared.cv.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        if s.generation == generation {
            return Err(aborted());
        }
        Ok(s)
    }

    /// Deposit `send[dst]` for every rank, wait for all, take what every rank left for this one,
    /// and wait again so the slots are free for the next collective.
    fn exchange(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let n = self.shared.size;
        if send.len() != n {
            return Err(Error::Input(format!("rank {}: {} send buffers for {n} ranks", self.rank, send.len())));
        }
        let mut s = lock(&self.shared);
        s.slots[self.rank] = send;
        let mut s = self.sync(s)?;
        let recv: Vec<Vec<f32>> = (0..n).map(|src| std::mem::take(&mut s.slots[src][self.rank])).collect();
        drop(self.sync(s)?);
        Ok(recv)
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let parts = self.all_gather(buf)?;
        if let Some(p) = parts.iter().find(|p| p.len() != buf.len()) {
            return Err(Error::Input(format!("all_reduce: buffers of {} and {} elements", buf.len(), p.len())));
        }
        // the same order of additions on every rank, so every rank gets the same bits
        buf.fill(0.0);
        for p in &parts {
            for (b, v) in buf.iter_mut().zip(p) {
                *b += v;
            }
        }
        Ok(())
    }

    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.exchange(vec![buf.to_vec(); self.shared.size])
    }

    fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>> {
        let n = self.shared.size;
        let send = (0..n).map(|r| buf[part_range(buf.len(), n, r)].to_vec()).collect();
        let parts = self.exchange(send)?;
        let mine = part_range(buf.len(), n, self.rank).len();
        let mut out = vec![0f32; mine];
        for p in &parts {
            if p.len() != mine {
                return Err(Error::Input(format!("reduce_scatter: parts of {mine} and {} elements", p.len())));
            }
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        Ok(out)
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        self.exchange(send)
    }

    fn broadcast(&self, buf: &mut Vec<f32>, root: usize) -> Result<()> {
        let n = self.shared.size;
        if root >= n {
            return Err(Error::Input(format!("broadcast root {root} in a group of {n}")));
        }
        let send = if self.rank == root { vec![buf.clone(); n] } else { vec![Vec::new(); n] };
        let mut recv = self.exchange(send)?;
        *buf = std::mem::take(&mut recv[root]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(vec![Vec::new(); self.shared.size]).map(|_| ())
    }

    fn abort(&self) {
        lock(&self.shared).aborted = true;
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f(comm)` on one thread per rank; results in rank order.
    fn on_ranks<R: Send>(n: usize, f: impl Fn(&ThreadComm) -> R + Sync) -> Vec<R> {
        let comms = ThreadGroup::new(n).comms();
        std::thread::scope(|s| {
            let handles: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    #[test]
    fn collectives_on_four_ranks() {
        let out = on_ranks(4, |c| {
            let r = c.rank() as f32;
            let mut sum = vec![r, 10.0 * r, 1.0];
            c.all_reduce_sum(&mut sum).unwrap();
            // uneven lengths
            let gathered = c.all_gather(&vec![r; c.rank() + 1]).unwrap();
            let scattered = c.reduce_scatter_sum(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]).unwrap();
            // rank src sends [src, dst] to every dst
            let a2a = c.all_to_all((0..4).map(|d| vec![r, d as f32]).collect()).unwrap();
            let mut b = if c.rank() == 2 { vec![7.0, 8.0] } else { vec![] };
            c.broadcast(&mut b, 2).unwrap();
            c.barrier().unwrap();
            (sum, gathered, scattered, a2a, b)
        });
        for (rank, (sum, gathered, scattered, a2a, b)) in out.into_iter().enumerate() {
            assert_eq!(sum, vec![6.0, 60.0, 4.0]);
            assert_eq!(gathered, (0..4).map(|s| vec![s as f32; s + 1]).collect::<Vec<_>>());
            // 7 elements in parts of 2: [0,2) [2,4) [4,6) [6,7), each summed over 4 ranks
            let want: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0][part_range(7, 4, rank)].iter().map(|v| v * 4.0).collect();
            assert_eq!(scattered, want);
            assert_eq!(a2a, (0..4).map(|s| vec![s as f32, rank as f32]).collect::<Vec<_>>());
            assert_eq!(b, vec![7.0, 8.0]);
        }
    }

    #[test]
    fn a_failed_rank_aborts_the_others_instead_of_hanging() {
        let group = ThreadGroup::new(3);
        let comms = group.comms();
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        if c.rank() == 1 {
                            c.abort();
                            return Err(Error::Input("rank 1 failed".into()));
                        }
                        let mut v = vec![1.0];
                        c.all_reduce_sum(&mut v)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        // after a reset the group works again
        group.reset();
        let sums: Vec<f32> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut v = vec![c.rank() as f32];
                        c.all_reduce_sum(&mut v).map(|_| v[0])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread").expect("sum")).collect()
        });
        assert_eq!(sums, vec![3.0; 3]);
    }

    #[test]
    fn a_missing_rank_times_out() {
        let comms = ThreadGroup::with_timeout(2, Duration::from_millis(50)).comms();
        let mut v = vec![1.0];
        let err = comms[0].all_reduce_sum(&mut v).unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }
}
