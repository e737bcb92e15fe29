//! NCCL smoke test on the GPU machine: one rank per visible GPU (at least the 1-rank group),
//! each on its own thread, runs every collective of the `Communicator` seam and checks the
//! results against what the in-process `ThreadComm` gives for the same inputs.

use std::sync::Arc;

use moeserve_core::{Communicator, ThreadGroup};
use moeserve_kernels::cuda::nccl::NcclComm;

/// The collectives on one rank: sums, gathers of uneven lengths, a reduce-scatter, an
/// all-to-all with an empty message, a broadcast and a barrier.
fn exercise(c: &dyn Communicator) -> Vec<Vec<f32>> {
    let (r, n) = (c.rank() as f32, c.world_size());
    let mut sum = vec![r, 1.0, 2.0 * r];
    c.all_reduce_sum(&mut sum).unwrap();
    let gathered = c.all_gather(&vec![r; c.rank() + 1]).unwrap().concat();
    let scattered = c.reduce_scatter_sum(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let send: Vec<Vec<f32>> = (0..n).map(|d| if d == 0 { Vec::new() } else { vec![r, d as f32] }).collect();
    let a2a = c.all_to_all(send).unwrap().concat();
    let mut b = if c.rank() == 0 { vec![7.0, 8.0, 9.0] } else { Vec::new() };
    c.broadcast(&mut b, 0).unwrap();
    c.barrier().unwrap();
    vec![sum, gathered, scattered, a2a, b]
}

fn on_threads<C: Communicator + 'static>(comms: Vec<Arc<C>>) -> Vec<Vec<Vec<f32>>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().map(|c| s.spawn(move || exercise(c.as_ref()))).collect();
        hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

#[test]
fn nccl_collectives_match_the_thread_group() {
    let devices = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().expect("CUDA driver") as usize;
    assert!(devices >= 1, "no CUDA device");
    let id = NcclComm::new_id().expect("NCCL id");
    for world in [1, devices] {
        // NCCL's init blocks until every rank has joined: one thread per rank
        let comms: Vec<Arc<NcclComm>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let id = if world == 1 { NcclComm::new_id().expect("NCCL id") } else { id.clone() };
                    s.spawn(move || Arc::new(NcclComm::new(r, r, world, &id).expect("NCCL init")))
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("init thread")).collect()
        });
        let got = on_threads(comms);
        let want = on_threads(ThreadGroup::new(world).comms().into_iter().map(Arc::new).collect());
        assert_eq!(got, want, "{world} ranks");
        println!("nccl: {world} rank(s): all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, barrier ok");
        if devices == 1 {
            break;
        }
    }
}
