//! Mixed precision: weights and Adam's moments stay float32 (the masters); the convs and
//! matmuls run in bfloat16 or float16, and the loss and KL are reduced in float32.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16 compute: float32's range, so no loss scaling is needed.
    Bf16,
    /// float16 compute with a dynamic loss scale; CUDA only.
    F16,
}

impl Precision {
    /// The dtype the convs and matmuls run in.
    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::F16 => Kind::Half,
        }
    }

    pub fn check_device(self, device: Device) -> Result<()> {
        if self == Precision::F16 && !device.is_cuda() {
            bail!("--precision f16 needs a CUDA device (found {device:?}); on the CPU use --precision bf16")
        }
        Ok(())
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// Dynamic loss scaling for float16, as `torch.amp.GradScaler` does it: float16 gradients
/// underflow unless the loss is scaled up; when the scale overflows them to inf, the step is
/// skipped and the scale halved; after `GROWTH_INTERVAL` good steps in a row it doubles.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScale {
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self { scale: 65536.0, good_steps: 0 }
    }
}

impl LossScale {
    const GROWTH_INTERVAL: u64 = 2000;

    /// Divides the gradients of a scaled loss by the scale, in place, and updates the scale.
    /// Returns false, leaving them untouched, when any is not finite: the step must be skipped.
    /// Reading that verdict is the one host sync of a float16 step (GradScaler makes it too).
    pub fn unscale(&mut self, grads: &[Tensor]) -> bool {
        let finite = tch::no_grad(|| {
            let all: Vec<Tensor> = grads.iter().map(|g| g.isfinite().all()).collect();
            all.is_empty() || Tensor::stack(&all, 0).all().int64_value(&[]) != 0
        });
        if !finite {
            self.scale /= 2.0;
            self.good_steps = 0;
            return false;
        }
        tch::no_grad(|| {
            for g in grads {
                let _ = g.shallow_clone().g_mul_scalar_(1.0 / self.scale);
            }
        });
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_good_steps() {
        let mut scaler = LossScale { scale: 8.0, good_steps: LossScale::GROWTH_INTERVAL - 2 };
        let grad = Tensor::from_slice(&[8.0f32, -16.0]);
        assert!(scaler.unscale(&[grad.shallow_clone()]));
        assert_eq!(Vec::<f32>::try_from(&grad).unwrap(), vec![1.0, -2.0]);
        assert_eq!(scaler, LossScale { scale: 8.0, good_steps: LossScale::GROWTH_INTERVAL - 1 });
        assert!(scaler.unscale(&[grad.shallow_clone()]));
        assert_eq!(scaler, LossScale { scale: 16.0, good_steps: 0 });

        let overflow = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        let nan = Tensor::from_slice(&[f32::NAN]);
        assert!(!scaler.unscale(&[grad.shallow_clone(), overflow.shallow_clone(), nan]));
        assert_eq!(scaler, LossScale { scale: 8.0, good_steps: 0 });
        assert_eq!(Vec::<f32>::try_from(&overflow).unwrap(), vec![1.0, f32::INFINITY], "left untouched");
        assert!(Precision::F16.check_device(Device::Cpu).is_err());
    }
}
