//! Mini-batches gathered on the training device from a split that lives there as u8, or,
//! for a split streamed from disk, read by a background thread one batch ahead.

use super::dataset::Pixels;
use super::{Dataset, Records};
use crate::rng::{SplitMix64, Stream};
use anyhow::{Context, Result};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::mpsc;
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

pub struct Loader {
    source: Source,
    device: Device,
    batch_size: i64,
}

enum Source {
    /// The split on the device: a step costs one gather and one conversion there and no
    /// host-to-device copy.
    Resident(Tensor),
    /// The split on disk: each batch is read (ideally ahead, see [`Loader::prefetch`]) and
    /// copied to the device.
    Streamed(Prefetcher),
}

impl Loader {
    pub fn new(data: &Dataset, device: Device, batch_size: usize) -> Self {
        let source = match &data.pixels {
            Pixels::Resident(images) => Source::Resident(images.to_device(device)),
            Pixels::Streamed(records) => Source::Streamed(Prefetcher::spawn(records.clone())),
        };
        Self { source, device, batch_size: batch_size as i64 }
    }

    pub fn len(&self) -> usize {
        match &self.source {
            Source::Resident(images) => images.size()[0] as usize,
            Source::Streamed(prefetcher) => prefetcher.records.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size as usize
    }

    /// Batches in an epoch: training steps, the last holding the remainder.
    pub fn steps_per_epoch(&self) -> u64 {
        self.len().div_ceil(self.batch_size()) as u64
    }

    /// Where index tensors live: beside a resident split, on the host for a streamed one.
    fn index_device(&self) -> Device {
        match self.source {
            Source::Resident(_) => self.device,
            Source::Streamed(_) => Device::Cpu,
        }
    }

    /// Index tensors of one epoch's batches, shuffled by (seed, epoch) alone; the last batch
    /// holds the remainder.
    pub fn shuffled_batches(&self, seed: u64, epoch: u64) -> Vec<Tensor> {
        let order = SplitMix64::derived(seed, Stream::Shuffle, epoch).permutation(self.len());
        Tensor::from_slice(&order).to_device(self.index_device()).split(self.batch_size, 0)
    }

    /// Starts reading the images at `indices` in the background, for a `gather` that follows
    /// soon; a resident split needs nothing.
    pub fn prefetch(&self, indices: &Tensor) {
        if let Source::Streamed(prefetcher) = &self.source {
            prefetcher.request(index_vec(indices));
        }
    }

    /// Prefetches `batches[i + 1]`, if there is one: called as batch `i` starts, so the next
    /// is read while this one is used.
    pub fn prefetch_next(&self, batches: &[Tensor], i: usize) {
        if let Some(next) = batches.get(i + 1) {
            self.prefetch(next);
        }
    }

    /// Images `[B, C, H, W]` in [0, 1] at the given indices.
    pub fn gather(&self, indices: &Tensor) -> Result<Tensor> {
        let pixels = match &self.source {
            Source::Resident(images) => images.index_select(0, indices),
            Source::Streamed(prefetcher) => prefetcher.take(&index_vec(indices))?.to_device(self.device),
        };
        Ok(to_unit_float(&pixels))
    }

    /// The split in order, batch by batch, as floats in [0, 1], each batch read while the one
    /// before it is used.
    pub fn sequential(&self) -> impl Iterator<Item = Result<Tensor>> + '_ {
        self.shard(0, 1).map(|(_, x)| x)
    }

    /// Batches `rank`, `rank + world`, ... of [`Loader::sequential`], with their index: one
    /// rank's share of a pass that `world` ranks make together.
    pub fn shard(&self, rank: usize, world: usize) -> impl Iterator<Item = (usize, Result<Tensor>)> + '_ {
        let all = Tensor::arange(self.len() as i64, (Kind::Int64, self.index_device()));
        let batches = all.split(self.batch_size, 0);
        (rank..batches.len()).step_by(world).map(move |i| {
            if let Some(next) = batches.get(i + world) {
                self.prefetch(next);
            }
            (i, self.gather(&batches[i]))
        })
    }
}

fn index_vec(indices: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(indices).expect("int64 indices on the host")
}

/// Batches that `prefetch` may queue before the oldest unused one is dropped.
const MAX_PENDING: usize = 2;

/// A thread that reads requested batches in order, into tensors ready to move to the device;
/// `take` hands back the one asked for, or reads it on the spot when it was not requested
/// (the first batch, a resume).
struct Prefetcher {
    records: Records,
    requests: Option<mpsc::Sender<Vec<i64>>>,
    replies: mpsc::Receiver<Result<Tensor>>,
    /// Requests sent whose replies have not been taken, oldest first.
    pending: RefCell<VecDeque<Vec<i64>>>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    fn spawn(records: Records) -> Self {
        let (requests, inbox) = mpsc::channel::<Vec<i64>>();
        let (outbox, replies) = mpsc::channel();
        let reader = records.clone();
        let worker = std::thread::spawn(move || {
            for indices in inbox {
                if outbox.send(reader.read(&indices)).is_err() {
                    break;
                }
            }
        });
        Self { records, requests: Some(requests), replies, pending: RefCell::default(), worker: Some(worker) }
    }

    fn request(&self, indices: Vec<i64>) {
        let mut pending = self.pending.borrow_mut();
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
            let _unused = self.replies.recv();
        }
        if self.requests.as_ref().is_some_and(|r| r.send(indices.clone()).is_ok()) {
            pending.push_back(indices);
        }
    }

    fn take(&self, indices: &[i64]) -> Result<Tensor> {
        let mut pending = self.pending.borrow_mut();
        if pending.iter().any(|p| p == indices) {
            // Replies come in request order; those before the wanted one are stale.
            while let Some(requested) = pending.pop_front() {
                let reply = self.replies.recv().context("the prefetching thread stopped")?;
                if requested == indices {
                    return reply;
                }
            }
        }
        self.records.read(indices)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its current read is done.
        self.requests = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Each image of `[B, C, H, W]` mirrored left-right when its coin, a uniform draw in
/// `coins` (`[B]`), falls below 1/2.
pub fn random_hflip(x: &Tensor, coins: &Tensor) -> Tensor {
    let flip = coins.lt(0.5).view([-1, 1, 1, 1]);
    x.flip([3]).where_self(&flip, x)
}

/// u8 pixels to floats in [0, 1].
pub fn to_unit_float(pixels: &Tensor) -> Tensor {
    pixels.to_kind(Kind::Float) / 255.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_visits_every_image_once() {
        let pixels: Vec<u8> = (0..10u8).collect();
        let ds = Dataset::from_u8(&pixels, 10, 1, 1, 1, None);
        let loader = Loader::new(&ds, Device::Cpu, 4);
        let batches = loader.shuffled_batches(1, 0);
        assert_eq!(batches.iter().map(|b| b.size()[0]).collect::<Vec<_>>(), vec![4, 4, 2]);
        let mut seen: Vec<f32> = batches
            .iter()
            .flat_map(|b| Vec::<f32>::try_from(loader.gather(b).unwrap().flatten(0, -1)).unwrap())
            .collect();
        seen.sort_by(f32::total_cmp);
        let expected: Vec<f32> = (0..10).map(|i| i as f32 / 255.0).collect();
        assert_eq!(seen, expected);
        assert_eq!(loader.sequential().count(), 3);
    }

    fn floats(x: Result<Tensor>) -> Vec<f32> {
        Vec::<f32>::try_from(x.unwrap().flatten(0, -1)).unwrap()
    }

    #[test]
    fn a_streamed_split_gives_the_resident_batches_whatever_was_prefetched() {
        let pixels: Vec<u8> = (0..50 * 2 * 3 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let (resident, streamed) =
            super::super::dataset::tests::resident_and_streamed(&pixels, 50, [2, 3, 3]);
        let (resident, streamed) =
            (Loader::new(&resident, Device::Cpu, 8), Loader::new(&streamed, Device::Cpu, 8));
        let (a, b) = (resident.shuffled_batches(3, 1), streamed.shuffled_batches(3, 1));
        assert_eq!(b.len(), 7);
        // In training order, each batch read ahead; then out of order, skipping a prefetched
        // batch, prefetching more than is taken, and taking one never prefetched.
        for i in 0..b.len() {
            if let Some(next) = b.get(i + 1) {
                streamed.prefetch(next);
            }
            assert_eq!(floats(streamed.gather(&b[i])), floats(resident.gather(&a[i])), "batch {i}");
        }
        for i in [0, 1, 2] {
            streamed.prefetch(&b[i]);
        }
        assert_eq!(floats(streamed.gather(&b[2])), floats(resident.gather(&a[2])));
        assert_eq!(floats(streamed.gather(&b[0])), floats(resident.gather(&a[0])));
        streamed.prefetch(&b[5]);
        streamed.prefetch(&b[6]);
        streamed.prefetch(&b[4]);
        assert_eq!(floats(streamed.gather(&b[4])), floats(resident.gather(&a[4])));
        let all = |l: &Loader| l.sequential().flat_map(floats).collect::<Vec<f32>>();
        assert_eq!(all(&streamed), all(&resident));
        assert_eq!(all(&streamed).len(), pixels.len());
    }

    #[test]
    fn hflip_mirrors_some_images_and_keeps_the_others() {
        tch::manual_seed(4);
        let x = Tensor::rand([64, 2, 3, 5], (Kind::Float, Device::Cpu));
        let y = random_hflip(&x, &Tensor::rand([64], (Kind::Float, Device::Cpu)));
        let (mut kept, mut flipped) = (0, 0);
        for i in 0..64 {
            if y.get(i).equal(&x.get(i)) {
                kept += 1;
            } else if y.get(i).equal(&x.get(i).flip([2])) {
                flipped += 1;
            }
        }
        assert_eq!(kept + flipped, 64, "every image is itself or its mirror");
        assert!(kept > 16 && flipped > 16, "kept {kept}, flipped {flipped}");
    }
}
