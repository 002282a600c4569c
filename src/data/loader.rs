//! Mini-batches gathered on the training device from a split that lives there as u8.

use super::Dataset;
use crate::rng::{SplitMix64, Stream};
use tch::{Device, Kind, Tensor};

/// Holds one split on the device, so a step costs one gather and one conversion there and
/// no host-to-device copy.
pub struct Loader {
    images: Tensor,
    batch_size: i64,
}

impl Loader {
    pub fn new(data: &Dataset, device: Device, batch_size: usize) -> Self {
        Self { images: data.images.to_device(device), batch_size: batch_size as i64 }
    }

    pub fn len(&self) -> usize {
        self.images.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size as usize
    }

    /// Index tensors of one epoch's batches, shuffled by (seed, epoch) alone; the last batch
    /// holds the remainder.
    pub fn shuffled_batches(&self, seed: u64, epoch: u64) -> Vec<Tensor> {
        let order = SplitMix64::derived(seed, Stream::Shuffle, epoch).permutation(self.len());
        let order = Tensor::from_slice(&order).to_device(self.images.device());
        order.split(self.batch_size, 0)
    }

    /// Images `[B, C, H, W]` in [0, 1] at the given indices.
    pub fn gather(&self, indices: &Tensor) -> Tensor {
        to_unit_float(&self.images.index_select(0, indices))
    }

    /// The split in order, batch by batch, as floats in [0, 1].
    pub fn sequential(&self) -> impl Iterator<Item = Tensor> + '_ {
        self.images.split(self.batch_size, 0).into_iter().map(|b| to_unit_float(&b))
    }
}

/// Each image of `[B, C, H, W]` mirrored left-right with probability 1/2, drawn from
/// libtorch's generator (which the trainer seeds per step).
pub fn random_hflip(x: &Tensor) -> Tensor {
    let flip = Tensor::rand([x.size()[0], 1, 1, 1], (Kind::Float, x.device())).lt(0.5);
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
            .flat_map(|b| Vec::<f32>::try_from(loader.gather(b).flatten(0, -1)).unwrap())
            .collect();
        seen.sort_by(f32::total_cmp);
        let expected: Vec<f32> = (0..10).map(|i| i as f32 / 255.0).collect();
        assert_eq!(seen, expected);
        assert_eq!(loader.sequential().count(), 3);
    }

    #[test]
    fn hflip_mirrors_some_images_and_keeps_the_others() {
        tch::manual_seed(4);
        let x = Tensor::rand([64, 2, 3, 5], (Kind::Float, Device::Cpu));
        let y = random_hflip(&x);
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
