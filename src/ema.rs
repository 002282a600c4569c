//! An exponential moving average of the weights (`--ema-decay`), kept as latent diffusion's
//! `LitEma` keeps it: after n updates the decay is min(decay, (1 + n) / (10 + n)), so the
//! first averages are not dominated by the random initialisation. Evaluation, pictures and
//! exports use the average; the optimizer never sees it.

use crate::native;
use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Where the averages live in a checkpoint: `ema.<parameter name>`.
pub const PREFIX: &str = "ema.";
/// The update count, an int64 scalar beside them.
const UPDATES: &str = "ema.num_updates";

pub struct Ema {
    pub decay: f64,
    updates: u64,
    /// The parameters' names, the live parameters and their averages, in name order (separate
    /// lists: the update hands the last two to one multi-tensor kernel as they are).
    names: Vec<String>,
    params: Vec<Tensor>,
    averages: Vec<Tensor>,
}

impl Ema {
    /// Averages starting at the weights of `vs` now.
    pub fn new(vs: &VarStore, decay: f64) -> Self {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let averages = named.iter().map(|(_, p)| p.detach().copy()).collect();
        let (names, params) = named.into_iter().unzip();
        Self { decay, updates: 0, names, params, averages }
    }

    /// The decay of the next update.
    fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Moves each average towards its parameter: avg += (1 - decay) * (param - avg).
    pub fn update(&mut self) {
        let weight = 1.0 - self.current_decay();
        tch::no_grad(|| native::lerp_(&self.averages, &self.params, weight));
        self.updates += 1;
    }

    /// The averages under their checkpoint names, and the update count.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .names
            .iter()
            .zip(&self.averages)
            .map(|(name, average)| (format!("{PREFIX}{name}"), average.shallow_clone()))
            .collect();
        out.push((UPDATES.into(), Tensor::from(self.updates as i64)));
        out
    }

    /// Restores what [`Ema::state`] saved, reading tensors through `get`.
    pub fn load_state(&mut self, get: impl Fn(&str) -> Option<Tensor>) -> Result<()> {
        let updates =
            get(UPDATES).with_context(|| format!("{UPDATES} is missing (the run averages its weights)"))?;
        self.updates = u64::try_from(updates.int64_value(&[])).context("a negative EMA update count")?;
        for (name, average) in self.names.iter().zip(&self.averages) {
            let key = format!("{PREFIX}{name}");
            let saved = get(&key).with_context(|| format!("{key} is missing"))?;
            ensure!(
                saved.size() == average.size(),
                "{key} has shape {:?}, the model {:?}",
                saved.size(),
                average.size()
            );
            tch::no_grad(|| {
                average.shallow_clone().copy_(&saved.to_kind(Kind::Float).to_device(average.device()))
            });
        }
        Ok(())
    }

    /// Runs `f` with the averages in the model's parameters, then puts the trained weights back
    /// (bit for bit: a run with pictures and evaluation stays the run without them).
    pub fn swapped<T>(&self, f: impl FnOnce() -> T) -> T {
        let trained: Vec<Tensor> = self.params.iter().map(|param| param.detach().copy()).collect();
        let copy_into = |dst: &Tensor, src: &Tensor| tch::no_grad(|| dst.shallow_clone().copy_(src));
        for (param, average) in self.params.iter().zip(&self.averages) {
            copy_into(param, average);
        }
        let out = f();
        for (param, weights) in self.params.iter().zip(&trained) {
            copy_into(param, weights);
        }
        out
    }
}

/// The averaged weights of a checkpoint's tensors, under the model's names; `None` when it
/// has none.
pub fn averaged_weights(tensors: &HashMap<String, Tensor>) -> Option<HashMap<String, Tensor>> {
    let averaged: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(name, _)| name.as_str() != UPDATES)
        .filter_map(|(name, t)| Some((name.strip_prefix(PREFIX)?.to_string(), t.shallow_clone())))
        .collect();
    (!averaged.is_empty()).then_some(averaged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_average_follows_litemas_decay_and_swaps_back_exactly() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], tch::nn::Init::Const(0.0));
        let mut ema = Ema::new(&vs, 0.99);
        let _ = tch::no_grad(|| w.shallow_clone().fill_(1.0));
        ema.update(); // decay min(0.99, 1/10): the average moves 0.9 of the way, to 0.9
        ema.update(); // decay 2/11
        let expected = 0.9 + 0.1 * (1.0 - 2.0 / 11.0);
        let average = ema.state()[0].1.double_value(&[0]);
        assert!((average - expected).abs() < 1e-6, "{average} vs {expected}");
        let seen = ema.swapped(|| w.double_value(&[1]));
        assert!((seen - expected).abs() < 1e-6);
        assert_eq!(w.double_value(&[1]), 1.0, "the trained weight is back");
        let mut restored = Ema::new(&vs, 0.99);
        let state: HashMap<String, Tensor> = ema.state().into_iter().collect();
        restored.load_state(|n| state.get(n).map(Tensor::shallow_clone)).unwrap();
        assert_eq!(restored.updates, 2);
        assert!(restored.state()[0].1.equal(&ema.state()[0].1));
    }
}
