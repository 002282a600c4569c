//! The c10d shim: a Gloo group of two ranks (two threads here) sums, broadcasts and meets at
//! a barrier; a rank with nobody to meet fails with the address named, within its timeout.

use std::time::Duration;
use tch::{Kind, Tensor};
use vae::dist::{ProcessGroup, AVAILABLE};

const TIMEOUT: Duration = Duration::from_secs(60);

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// What rank `rank` of two sees: its sum, the broadcast, then the barrier.
fn rank_work(group: ProcessGroup) -> (Vec<f32>, Vec<f32>) {
    let rank = group.rank as f64;
    let mut summed = [Tensor::arange(4, (Kind::Float, tch::Device::Cpu)) * (rank + 1.0)];
    group.all_reduce_sum(&mut summed).unwrap();
    let mut shared = [Tensor::full([3], rank + 10.0, (Kind::Float, tch::Device::Cpu))];
    group.broadcast(&mut shared, 0).unwrap();
    group.barrier().unwrap();
    (values(&summed[0]), values(&shared[0]))
}

/// A port nobody listens on now (the store binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn two_ranks_sum_broadcast_and_meet() {
    if !AVAILABLE {
        let err = ProcessGroup::connect_at("127.0.0.1", 1, 0, 2, TIMEOUT).err().unwrap().to_string();
        assert!(err.contains("install Debian's libgloo-dev"), "{err}");
        return;
    }
    let port = free_port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || {
                let group = ProcessGroup::connect_at("127.0.0.1", port, rank, 2, TIMEOUT)
                    .unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
                assert_eq!((group.rank, group.world, group.port), (rank, 2, port));
                rank_work(group)
            })
        })
        .collect();
    for handle in ranks {
        let (summed, shared) = handle.join().unwrap();
        // arange(4) * 1 + arange(4) * 2; rank 0's 10s everywhere.
        assert_eq!(summed, vec![0.0, 3.0, 6.0, 9.0]);
        assert_eq!(shared, vec![10.0; 3]);
    }

    // Rank 1 of 2 waits for a store that never starts, and gives up when its timeout ends.
    let port = free_port();
    let err =
        ProcessGroup::connect_at("127.0.0.1", port, 1, 2, Duration::from_secs(2)).err().expect("no store");
    let err = err.to_string();
    assert!(
        err.contains(&format!("rank 1 of 2 could not join the process group at 127.0.0.1:{port}")),
        "{err}"
    );
}
