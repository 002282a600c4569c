//! PyTorch's distributed engine (c10d) from Rust: a TCPStore rendezvous and a Gloo or NCCL
//! process group, through a small C++ shim (`shim.cpp` and `nccl.cpp`, compiled by build.rs
//! against the torch wheel's headers, Debian's `libgloo-dev` and PyPI's CUDA headers). tch
//! binds none of it. Knows tensors, not training.

use anyhow::{bail, ensure, Context, Result};
use tch::Device;

/// The c10d backend that carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Over TCP, between CPUs (c10d's Gloo also copies CUDA tensors through the host).
    Gloo,
    /// Between GPUs, over NVLink / InfiniBand / PCIe.
    Nccl,
}

impl Backend {
    /// PyTorch's default: NCCL for CUDA tensors, Gloo otherwise.
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() {
            Self::Nccl
        } else {
            Self::Gloo
        }
    }

    /// Whether this build carries it (its headers were there at build time).
    pub fn built(self) -> bool {
        match self {
            Self::Gloo => cfg!(vae_gloo),
            Self::Nccl => cfg!(vae_nccl),
        }
    }

    /// Refuses a backend this build lacks (saying what to install) or one the device cannot use.
    pub fn check(self, device: Device) -> Result<()> {
        ensure!(
            self != Self::Nccl || device.is_cuda(),
            "--dist-backend nccl needs a CUDA device, found {device:?}; use gloo on the CPU"
        );
        match (self, self.built()) {
            (_, true) => Ok(()),
            (Self::Gloo, false) => bail!(
                "this vae was built without torch.distributed support, as Gloo's headers were missing \
                 at build time; install Debian's libgloo-dev (scripts/setup does, as root) and rebuild"
            ),
            (Self::Nccl, false) => bail!(
                "this vae was built without NCCL, as the CUDA headers it needs were missing at build \
                 time; install nvidia-cuda-crt and nvidia-cuda-cccl into .venv (scripts/setup does) \
                 and rebuild"
            ),
        }
    }
}

/// A rank's place in a run of several processes, as torchrun, SLURM or `--nproc` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its machine (which GPU it takes).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's elastic agent already serves the store (`TORCHELASTIC_USE_AGENT_STORE`):
    /// every rank connects to it as a client.
    pub agent_store: bool,
}

impl DistEnv {
    /// From torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`), or under `srun` from SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`,
    /// `SLURM_LOCALID`, with `MASTER_ADDR` and `MASTER_PORT` from the job script), read
    /// through `var`; `None` when no launcher set them, or set a world of one.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let names = if var("WORLD_SIZE").is_some() {
            ["WORLD_SIZE", "RANK", "LOCAL_RANK"]
        } else if var("SLURM_NTASKS").is_some() && var("SLURM_PROCID").is_some() {
            ["SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"]
        } else {
            return Ok(None);
        };
        let [world_name, rank_name, local_name] = names;
        let number = |name: &str, text: String| -> Result<usize> {
            text.trim().parse().with_context(|| format!("{name}={text:?} is not a number"))
        };
        let required =
            |name: &str| var(name).with_context(|| format!("{world_name} is set but {name} is not"));
        let world = number(world_name, required(world_name)?)?;
        let rank = number(rank_name, required(rank_name)?)?;
        let local_rank = var(local_name).map(|t| number(local_name, t)).transpose()?.unwrap_or(0);
        ensure!(world >= 1, "{world_name} must be at least 1, found {world}");
        ensure!(rank < world, "{rank_name} {rank} is not below {world_name} {world}");
        if world == 1 {
            return Ok(None);
        }
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = required("MASTER_PORT")?;
        let master_port =
            port.trim().parse().with_context(|| format!("MASTER_PORT={port:?} is not a port"))?;
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(Some(Self { rank, world, local_rank, master_addr, master_port, agent_store }))
    }

    /// A group of one on this machine (rank 0 hosting its store on a free port): the same
    /// code path as a W-rank run, for `--dist-backend` on one device.
    pub fn alone() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            agent_store: false,
        }
    }

    /// Whether this rank hosts the store (rank 0, unless torchrun's agent does).
    pub(crate) fn serves(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }
}

#[cfg(not(vae_gloo))]
mod absent;
#[cfg(vae_gloo)]
mod group;

#[cfg(not(vae_gloo))]
pub use absent::ProcessGroup;
#[cfg(vae_gloo)]
pub use group::ProcessGroup;

/// How many of `group`'s ranks say `yes`: one small all-reduce, which every rank must call.
pub fn ranks_saying(group: &ProcessGroup, yes: bool) -> Result<usize> {
    let flag = tch::Tensor::from_slice(&[f32::from(u8::from(yes))]);
    group.all_reduce_sum(std::slice::from_ref(&flag))?;
    Ok(flag.double_value(&[0]) as usize)
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
        assert!(!env.agent_store);
        let slurm = DistEnv::from_vars(vars(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_PORT", "7"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (slurm.rank, slurm.world, slurm.local_rank, slurm.master_addr.as_str()),
            (5, 8, 1, "127.0.0.1")
        );
        assert_eq!(DistEnv::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let err = |pairs| DistEnv::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK is not"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).contains("not below WORLD_SIZE")
        );
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")]).contains("not a port"));
    }
}
