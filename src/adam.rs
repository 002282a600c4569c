//! Adam written on tensors, because tch does not expose its optimizer's state and exact
//! resume needs to checkpoint it. Follows `torch.optim.Adam` (L2 weight decay, not AdamW).

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient, as `torch.optim.Adam(weight_decay=...)`.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The moments of one parameter.
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct Adam {
    pub cfg: AdamConfig,
    slots: Vec<Slot>,
    /// Updates taken so far: the bias corrections' exponent. Kept on the host: no sync needed.
    step: u64,
}

/// Name prefix of the optimizer's tensors in a checkpoint.
pub const STATE_PREFIX: &str = "optimizer.";

impl Adam {
    /// Tracks every trainable variable of `vs`, in name order so the state is laid out the
    /// same way in every run.
    pub fn new(vs: &VarStore, cfg: AdamConfig) -> Self {
        let mut vars: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, param)| Slot {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
            })
            .collect();
        Self { cfg, slots, step: 0 }
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// One update from the gradients accumulated in the parameters.
    pub fn step(&mut self) {
        self.step += 1;
        let AdamConfig { lr, beta1, beta2, eps, weight_decay } = self.cfg;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                // Out of place, as torch does: the parameter's own .grad stays untouched.
                let grad = if weight_decay != 0.0 { grad + &slot.param * weight_decay } else { grad };
                // In-place ops return a handle to the tensor they modified; it is not needed.
                let _ = slot.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = slot.exp_avg_sq.g_mul_scalar_(beta2).addcmul_(&(&grad * (1.0 - beta2)), &grad);
                let denom = slot.exp_avg_sq.sqrt() / bias_correction2_sqrt + eps;
                let _ = slot.param.addcdiv_(&(&slot.exp_avg * -step_size), &denom);
            }
        });
    }

    /// The state as named tensors, PyTorch's names under [`STATE_PREFIX`]:
    /// `step`, `exp_avg.<param>`, `exp_avg_sq.<param>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{STATE_PREFIX}step"), Tensor::from(self.step as i64))];
        for slot in &self.slots {
            out.push((format!("{STATE_PREFIX}exp_avg.{}", slot.name), slot.exp_avg.shallow_clone()));
            out.push((format!("{STATE_PREFIX}exp_avg_sq.{}", slot.name), slot.exp_avg_sq.shallow_clone()));
        }
        out
    }

    /// Restores what [`Adam::state`] produced; `get` looks a tensor up by its full name.
    pub fn load_state(&mut self, get: impl Fn(&str) -> Option<Tensor>) -> Result<()> {
        let step_name = format!("{STATE_PREFIX}step");
        let step = get(&step_name).with_context(|| format!("missing tensor {step_name}"))?;
        let step = step.int64_value(&[]);
        ensure!(step >= 0, "{step_name} is negative ({step})");
        for slot in &mut self.slots {
            for (kind, dst) in [("exp_avg", &mut slot.exp_avg), ("exp_avg_sq", &mut slot.exp_avg_sq)] {
                let name = format!("{STATE_PREFIX}{kind}.{}", slot.name);
                let src = get(&name).with_context(|| format!("missing tensor {name}"))?;
                ensure!(
                    src.size() == dst.size(),
                    "tensor {name} has shape {:?}, the model needs {:?}",
                    src.size(),
                    dst.size()
                );
                tch::no_grad(|| dst.copy_(&src));
            }
        }
        self.step = step as u64;
        Ok(())
    }
}
