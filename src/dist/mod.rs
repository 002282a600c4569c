//! PyTorch's distributed engine (c10d) from Rust: a TCPStore rendezvous and a Gloo process
//! group, through a small C++ shim (`shim.cpp`, compiled by build.rs against the torch wheel's
//! headers and Debian's `libgloo-dev`). tch binds none of it. Knows tensors, not training.

use anyhow::{ensure, Context, Result};
use std::time::Duration;

/// A rank's place in a run of several processes, as torchrun, SLURM or `--nproc` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its machine (which GPU it takes).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// From torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`), read through `var`; `None` when no launcher set them.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let number = |name: &str, text: String| -> Result<usize> {
            text.trim().parse().with_context(|| format!("{name}={text:?} is not a number"))
        };
        let world = number("WORLD_SIZE", world)?;
        let required = |name: &str| var(name).with_context(|| format!("WORLD_SIZE is set but {name} is not"));
        let rank = number("RANK", required("RANK")?)?;
        let local_rank = var("LOCAL_RANK").map(|t| number("LOCAL_RANK", t)).transpose()?.unwrap_or(0);
        ensure!(world >= 1, "WORLD_SIZE must be at least 1, found {world}");
        ensure!(rank < world, "RANK {rank} is not below WORLD_SIZE {world}");
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = required("MASTER_PORT")?;
        let master_port =
            port.trim().parse().with_context(|| format!("MASTER_PORT={port:?} is not a port"))?;
        Ok(Some(Self { rank, world, local_rank, master_addr, master_port }))
    }
}

/// Whether this build carries the shim (Gloo's headers were there at build time).
pub const AVAILABLE: bool = cfg!(vae_gloo);

#[cfg(not(vae_gloo))]
mod absent;
#[cfg(vae_gloo)]
mod gloo;

#[cfg(not(vae_gloo))]
pub use absent::ProcessGroup;
#[cfg(vae_gloo)]
pub use gloo::ProcessGroup;

impl ProcessGroup {
    /// Joins the run at `env` (rank 0 hosts the store), waiting up to `timeout` for the others.
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self> {
        Self::connect_at(&env.master_addr, env.master_port, env.rank, env.world, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_variables_are_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
        let env = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world, env.local_rank, env.master_port), (3, 4, 1, 29500));
        let err = |pairs| DistEnv::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK is not"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).contains("not below WORLD_SIZE")
        );
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")]).contains("not a port"));
    }
}
