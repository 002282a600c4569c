//! What changes over a run, as pure functions of the step (so a resumed run follows the same
//! curve): the learning rate (warm-up, then constant or cosine decay) and the KL weight
//! (linear warm-up from 0 to beta).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Half a cosine from the peak rate down to 0 at the last step.
    Cosine,
}

/// The run's curves; steps count batches from the start of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    /// Steps of linear learning-rate warm-up from 0.
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub beta: f64,
    /// Steps over which the KL weight rises linearly from 0 to `beta` (0: none).
    pub kl_warmup_steps: u64,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// The KL weight of step `step`.
    pub fn beta_at(&self, step: u64) -> f64 {
        if step >= self.kl_warmup_steps {
            self.beta
        } else {
            self.beta * step as f64 / self.kl_warmup_steps as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_cosine_down_to_zero_and_kl_warm_up() {
        let s = Schedule {
            lr: 1e-3,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 10,
            total_steps: 110,
            beta: 2.0,
            kl_warmup_steps: 50,
        };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - 5e-4).abs() < 1e-12, "half way down at half the decay");
        assert!(s.lr_at(110).abs() < 1e-12 && s.lr_at(500).abs() < 1e-12);
        assert!((0..110).all(|t| s.lr_at(t + 1) <= s.lr_at(t) || t < 10));
        assert_eq!((s.beta_at(0), s.beta_at(25), s.beta_at(50), s.beta_at(900)), (0.0, 1.0, 2.0, 2.0));
        let constant =
            Schedule { lr_schedule: LrSchedule::Constant, warmup_steps: 0, kl_warmup_steps: 0, ..s };
        assert_eq!((constant.lr_at(0), constant.lr_at(109), constant.beta_at(0)), (1e-3, 1e-3, 2.0));
    }
}
