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
    /// torchrun's count of this run's restarts after a failure (`TORCHELASTIC_RESTART_COUNT`).
    pub restart: u64,
    /// One of srun's tasks, which may each see their own GPU alone (`--gpus-per-task`).
    pub srun: bool,
}

impl DistEnv {
    /// From torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`), or, in one of `srun`'s tasks, from SLURM's (`SLURM_PROCID`,
    /// `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, with `MASTER_ADDR` and `MASTER_PORT` from the
    /// job script), read through `var`; `None` when no launcher set them, or set a world of one.
    /// The step's task count, not the job's `SLURM_NTASKS`: a job script has that one and
    /// `SLURM_PROCID` 0 too without being one of several ranks (see [`slurm_tasks_outside_srun`]),
    /// and a step may run fewer tasks than its job.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let names = if var("WORLD_SIZE").is_some() {
            ["WORLD_SIZE", "RANK", "LOCAL_RANK"]
        } else if var("SLURM_STEP_NUM_TASKS").is_some() && var("SLURM_PROCID").is_some() {
            ["SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"]
        } else {
            return Ok(None);
        };
        let [world_name, rank_name, local_name] = names;
        let required =
            |name: &str| var(name).with_context(|| format!("{world_name} is set but {name} is not"));
        let world = number(world_name, &required(world_name)?)?;
        let rank = number(rank_name, &required(rank_name)?)?;
        let local_rank = var(local_name).map(|t| number(local_name, &t)).transpose()?.unwrap_or(0);
        ensure!(world >= 1, "{world_name} must be at least 1, found {world}");
        ensure!(rank < world, "{rank_name} {rank} is not below {world_name} {world}");
        if world == 1 {
            return Ok(None);
        }
        // The ranks meet at rank 0's store: on one machine it can be this one, on several
        // each rank would otherwise wait for a store of its own until --dist-timeout.
        let nodes = var("SLURM_STEP_NUM_NODES").map(|n| number("SLURM_STEP_NUM_NODES", &n)).transpose()?;
        let srun = world_name == "SLURM_STEP_NUM_TASKS";
        let master_addr = match var("MASTER_ADDR") {
            Some(addr) => addr,
            None if nodes.is_some_and(|n| n > 1) => slurm_master(&var, rank)?,
            None => "127.0.0.1".into(),
        };
        let master_port = match (var("MASTER_PORT"), var("SLURM_JOB_ID").filter(|_| srun)) {
            (Some(port), _) => {
                port.trim().parse().with_context(|| format!("MASTER_PORT={port:?} is not a port"))?
            }
            (None, Some(job)) => slurm_port(&job, var("SLURM_STEP_ID").as_deref())?,
            (None, None) => bail!(
                "{world_name} is set but MASTER_PORT is not: the ranks meet at MASTER_ADDR:MASTER_PORT \
                 (torchrun sets both; under srun, export them in the job script, e.g. MASTER_PORT=29500)"
            ),
        };
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let restart = var("TORCHELASTIC_RESTART_COUNT").map(|n| number("TORCHELASTIC_RESTART_COUNT", &n));
        let restart = restart.transpose()?.unwrap_or(0) as u64;
        Ok(Some(Self { rank, world, local_rank, master_addr, master_port, agent_store, restart, srun }))
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
            restart: 0,
            srun: false,
        }
    }

    /// Whether this rank hosts the store (rank 0, unless torchrun's agent does).
    pub(crate) fn serves(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }

    /// Where this attempt's ranks keep their keys in the store: torchrun's agent serves one
    /// store to every attempt of a run (its restarts after a failure), and an address that an
    /// earlier attempt's rank left there sends a rank of this one to a process that is gone.
    /// As PyTorch's `env://` rendezvous: `/worker/attempt_N`; none in a store of our own.
    #[cfg_attr(not(vae_gloo), allow(dead_code))]
    pub(crate) fn store_prefix(&self) -> String {
        if self.agent_store {
            format!("/worker/attempt_{}", self.restart)
        } else {
            String::new()
        }
    }

    /// The GPU this rank takes, of the `visible` ones: its local rank's, as torchrun's ranks
    /// and srun's tasks all see every GPU of their machine by default; the one it sees where
    /// srun gives each task its own alone (`--gpus-per-task=1` narrows `CUDA_VISIBLE_DEVICES`).
    /// Ranks beyond the GPUs are refused: NCCL takes one GPU per rank.
    pub fn gpu(&self, visible: usize) -> Result<usize> {
        let local_rank = self.local_rank;
        match visible {
            1 if self.srun => Ok(0),
            n if local_rank < n => Ok(local_rank),
            n => bail!(
                "the rank of local rank {local_rank} sees {n} GPU(s) (CUDA_VISIBLE_DEVICES={}): one GPU \
                 per rank needs a GPU for each rank on this machine; --device cuda:N picks one",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            ),
        }
    }
}

/// Rank 0's machine in an srun step over several, where the job script exported no
/// MASTER_ADDR (as PyTorch Lightning finds it): the first node of the step, where srun's
/// default block distribution puts task 0. Rank 0 checks that it runs there: under another
/// distribution the others would wait at an address that nobody serves.
fn slurm_master(var: &impl Fn(&str) -> Option<String>, rank: usize) -> Result<String> {
    let export = "export MASTER_ADDR=<rank 0's host> MASTER_PORT=29500 in the job script, before srun";
    let (name, list) = ["SLURM_STEP_NODELIST", "SLURM_NODELIST"]
        .into_iter()
        .find_map(|name| var(name).map(|list| (name, list)))
        .with_context(|| {
            format!("this srun step spans several nodes, but neither MASTER_ADDR nor SLURM_STEP_NODELIST is set: {export}")
        })?;
    let first = first_host(&list).with_context(|| format!("{name}={list:?} is not a SLURM host list"))?;
    if let (0, Some(node)) = (rank, var("SLURMD_NODENAME")) {
        ensure!(
            node == first,
            "rank 0 runs on {node}, not on {first}, the first node of {name}={list:?} where the other ranks \
             look for it (srun's --distribution not block?): {export}"
        );
    }
    Ok(first)
}

/// The port of an srun step whose job script exported no MASTER_PORT: one of 15000-24999 from
/// the job's id (as PyTorch Lightning picks it) plus the step's, so neither two jobs on a node
/// nor two steps of a job run side by side (a sweep of `srun ... &`) are likely to meet.
fn slurm_port(job: &str, step: Option<&str>) -> Result<u16> {
    let step = step.map(|s| number("SLURM_STEP_ID", s)).transpose()?.unwrap_or(0);
    Ok(15000 + ((number("SLURM_JOB_ID", job)? + step) % 10000) as u16)
}

/// The first host of a SLURM host list: `node[07-09,12],gpu3` gives `node07`, keeping the
/// range's zero padding; `rack[1-2]-n[3-4]` gives `rack1-n3`.
fn first_host(list: &str) -> Result<String> {
    let (mut host, mut in_brackets, mut taking) = (String::new(), false, true);
    for c in list.trim().chars() {
        match (c, in_brackets) {
            (',', false) => break,
            ('[', false) => (in_brackets, taking) = (true, true),
            (']', true) => in_brackets = false,
            ('[' | ']', _) => bail!("unbalanced brackets"),
            (',' | '-', true) => taking = false,
            (c, true) if taking && !c.is_ascii_digit() => bail!("{c:?} in a range of numbers"),
            (c, _) if taking || !in_brackets => host.push(c),
            _ => {}
        }
    }
    ensure!(!in_brackets, "unbalanced brackets");
    ensure!(!host.is_empty() && !host.ends_with('-'), "no host");
    Ok(host)
}

/// A launcher's variable as a count or index.
fn number(name: &str, text: &str) -> Result<usize> {
    text.trim().parse().with_context(|| format!("{name}={text:?} is not a number"))
}

/// The job's task count where this process is a SLURM job's own script, or a command it ran
/// without `srun` (`SLURM_NTASKS` and `SLURM_PROCID` set, `SLURM_STEP_NUM_TASKS` not), in a
/// job of several tasks: it is no rank of them, and trains alone unless it starts ranks itself.
pub fn slurm_tasks_outside_srun(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    if var("WORLD_SIZE").is_some() || var("SLURM_STEP_NUM_TASKS").is_some() || var("SLURM_PROCID").is_none() {
        return None;
    }
    var("SLURM_NTASKS").and_then(|n| n.trim().parse().ok()).filter(|&n| n > 1)
}

/// libtorch's CPU threads for one of srun's tasks where neither `--threads` nor
/// OMP_NUM_THREADS says, on a machine whose process may run on `cores` CPUs (its affinity):
/// the CPUs SLURM allotted each task (`--cpus-per-task`, SLURM_CPUS_PER_TASK), as torchrun
/// shares cores through OMP_NUM_THREADS; without that, where the task is not bound to CPUs of
/// its own (its affinity is every CPU of the node, SLURM_CPUS_ON_NODE), the node's CPUs shared
/// among the step's tasks there (SLURM_STEP_TASKS_PER_NODE). Otherwise every task would take
/// every core of the machine (2 ranks on 2 cores trained 3-4x slower that way).
pub fn srun_threads(var: impl Fn(&str) -> Option<String>, cores: usize) -> Option<i32> {
    if var("WORLD_SIZE").is_some()
        || var("SLURM_STEP_NUM_TASKS").is_none()
        || var("OMP_NUM_THREADS").is_some()
    {
        return None;
    }
    let number = |name: &str| var(name).and_then(|n| n.trim().parse::<usize>().ok()).filter(|&n| n >= 1);
    if let Some(cpus) = number("SLURM_CPUS_PER_TASK") {
        return i32::try_from(cpus).ok();
    }
    let unbound = number("SLURM_CPUS_ON_NODE") == Some(cores);
    let node = var("SLURM_NODEID").and_then(|n| n.trim().parse().ok());
    let tasks = tasks_on_this_node(&var("SLURM_STEP_TASKS_PER_NODE")?, node, || {
        number("SLURM_STEP_NUM_NODES") == number("SLURM_JOB_NUM_NODES").or(number("SLURM_NNODES"))
    })?;
    (unbound && tasks > 1).then(|| (cores / tasks).max(1) as i32)
}

/// The tasks on this node of a step whose tasks per node SLURM writes as `2(x3),1` (3 nodes
/// of 2, then one of 1): the same on every node, or this node's, at `node` (the node's index in
/// the job, which is its index in the step where the step spans the job's nodes: `whole`).
fn tasks_on_this_node(per_node: &str, node: Option<usize>, whole: impl Fn() -> bool) -> Option<usize> {
    let mut counts: Vec<usize> = Vec::new();
    for part in per_node.split(',') {
        let (tasks, times): (usize, usize) = match part.trim().split_once("(x") {
            Some((tasks, times)) => (tasks.parse().ok()?, times.strip_suffix(')')?.parse().ok()?),
            None => (part.trim().parse().ok()?, 1),
        };
        counts.extend(std::iter::repeat_n(tasks, times.min(1 << 16)));
    }
    let first = *counts.first()?;
    if counts.iter().all(|&c| c == first) {
        return Some(first);
    }
    whole().then(|| counts.get(node?).copied()).flatten()
}

#[cfg(not(vae_gloo))]
mod absent;
#[cfg(vae_gloo)]
mod group;

#[cfg(not(vae_gloo))]
pub use absent::ProcessGroup;
#[cfg(vae_gloo)]
pub use group::ProcessGroup;

/// Rank 0 says that its work alone (`what`) is done; every other rank waits for that as long
/// as it takes while rank 0 lives (decoding a large folder, writing a large checkpoint to a
/// network file system: either may outlast `--dist-timeout`, which a collective would not
/// wait out). Rank 1 says so for them all each time another timeout's length has passed.
pub fn rank_0_done(group: &ProcessGroup, key: &str, what: &str) -> Result<()> {
    if group.rank == 0 {
        return group.announce(key);
    }
    let waiting =
        if group.world == 2 { "rank 1".to_string() } else { format!("ranks 1 to {}", group.world - 1) };
    group.wait_for(key, |waited| {
        if group.rank == 1 {
            note!(
                "{waiting}: waiting for rank 0 to {what} ({} s so far; the wait ends when it has, or \
                 when rank 0 is gone)",
                waited.as_secs()
            )
        }
    })
}

/// Rank 0's `mine` on every rank (a broadcast), and how many ranks hold other values than
/// rank 0's (every rank learns it, so all can stop together). Every rank must call it.
pub fn rank_0s<const N: usize>(group: &ProcessGroup, mine: [i64; N]) -> Result<([i64; N], usize)> {
    let theirs = tch::Tensor::from_slice(&mine);
    group.broadcast(std::slice::from_ref(&theirs), 0)?;
    let theirs: [i64; N] = Vec::<i64>::try_from(&theirs)?.try_into().expect("N values");
    Ok((theirs, ranks_saying(group, theirs != mine)?))
}

/// Rank 0's `mine` on every rank, of any length (its length first, then the bytes). Every
/// rank must call it.
pub fn rank_0s_bytes(group: &ProcessGroup, mine: &[u8]) -> Result<Vec<u8>> {
    let len = tch::Tensor::from_slice(&[mine.len() as i64]);
    group.broadcast(std::slice::from_ref(&len), 0)?;
    let bytes = match group.rank {
        0 => tch::Tensor::from_slice(mine),
        _ => tch::Tensor::zeros([len.int64_value(&[0])], (tch::Kind::Uint8, Device::Cpu)),
    };
    group.broadcast(std::slice::from_ref(&bytes), 0)?;
    Ok(Vec::<u8>::try_from(&bytes)?)
}

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
        assert!(!env.agent_store && env.store_prefix().is_empty());
        // A restarted attempt under torchrun's agent keeps to its own keys of the agent's store.
        let attempt = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(attempt.store_prefix(), "/worker/attempt_3");
        // One of srun's tasks: its step's size counts, not the job's.
        let slurm = DistEnv::from_vars(vars(&[
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_STEP_NUM_NODES", "1"),
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
        // The job script of a job of 4 tasks, not started by srun, is no rank of them.
        let script: &[(&str, &str)] = &[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")];
        assert_eq!(DistEnv::from_vars(vars(script)).unwrap(), None);
        assert_eq!(slurm_tasks_outside_srun(vars(script)), Some(4));
        assert_eq!(slurm_tasks_outside_srun(vars(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")])), None);
        assert_eq!(
            slurm_tasks_outside_srun(vars(&[("SLURM_NTASKS", "4"), ("SLURM_STEP_NUM_TASKS", "4")])),
            None
        );
        assert_eq!(slurm_tasks_outside_srun(vars(&[])), None);
        // srun's tasks take the CPUs SLURM gave each, unless OMP_NUM_THREADS says.
        let task = &[("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_PROCID", "1"), ("SLURM_CPUS_PER_TASK", "6")];
        assert_eq!(srun_threads(vars(task), 24), Some(6));
        assert_eq!(srun_threads(vars(&[("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_PROCID", "1")]), 24), None);
        assert_eq!(srun_threads(vars(&[("SLURM_CPUS_PER_TASK", "6"), ("SLURM_PROCID", "0")]), 24), None);
        let told = &[("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_CPUS_PER_TASK", "6"), ("OMP_NUM_THREADS", "2")];
        assert_eq!(srun_threads(vars(told), 24), None);
        // Without --cpus-per-task: an unbound task (every CPU of the node) shares them among
        // the step's tasks on its node; a bound one keeps its own.
        let unbound: &[(&str, &str)] = &[
            ("SLURM_STEP_NUM_TASKS", "6"),
            ("SLURM_CPUS_ON_NODE", "24"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2),2"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_NUM_NODES", "3"),
            ("SLURM_JOB_NUM_NODES", "3"),
        ];
        assert_eq!(srun_threads(vars(unbound), 24), Some(12), "the last node's 2 tasks");
        assert_eq!(srun_threads(vars(unbound), 1), None, "bound to one CPU");
        let first: &[(&str, &str)] = &[
            ("SLURM_STEP_NUM_TASKS", "6"),
            ("SLURM_CPUS_ON_NODE", "24"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2),2"),
            ("SLURM_NODEID", "0"),
            ("SLURM_STEP_NUM_NODES", "3"),
            ("SLURM_NNODES", "3"),
        ];
        assert_eq!(srun_threads(vars(first), 24), Some(6));
        assert_eq!(tasks_on_this_node("4(x2),2", Some(0), || false), None, "a step on part of the job");
        assert_eq!(tasks_on_this_node("3(x4)", None, || false), Some(3));
        assert_eq!(tasks_on_this_node("1", None, || false), Some(1));
        assert_eq!(tasks_on_this_node("x(2", None, || true), None);
        assert_eq!(DistEnv::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let err = |pairs| DistEnv::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK is not"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).contains("not below WORLD_SIZE")
        );
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")]).contains("not a port"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_PORT is not"));
        // A step over two machines cannot meet on each one's localhost: without MASTER_ADDR
        // and MASTER_PORT, rank 0 is on the step's first node, at a port from the job's id.
        let step: &[(&str, &str)] = &[
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_STEP_NUM_NODES", "2"),
            ("SLURM_STEP_NODELIST", "gpu[007-008]"),
            ("SLURM_JOB_ID", "4123456"),
        ];
        let task = |rank, node| {
            let mut pairs = step.to_vec();
            pairs.extend([("SLURM_PROCID", rank), ("SLURMD_NODENAME", node)]);
            DistEnv::from_vars(|k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
        };
        for (rank, node) in [("0", "gpu007"), ("5", "gpu008")] {
            let env = task(rank, node).unwrap().unwrap();
            assert_eq!((env.master_addr.as_str(), env.master_port), ("gpu007", 18456));
        }
        assert_eq!(slurm_port("4129999", Some("2")).unwrap(), 15001);
        let elsewhere = task("0", "gpu008").unwrap_err().to_string();
        assert!(elsewhere.contains("rank 0 runs on gpu008, not on gpu007"), "{elsewhere}");
        let no_list =
            err(&[("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_STEP_NUM_NODES", "2"), ("SLURM_PROCID", "1")]);
        assert!(no_list.contains("neither MASTER_ADDR nor SLURM_STEP_NODELIST is set"), "{no_list}");
    }

    #[test]
    fn a_host_list_gives_its_first_host() {
        for (list, first) in [
            ("node[07-09,12],gpu3", "node07"),
            ("gpu-a1,gpu-b[1-2]", "gpu-a1"),
            ("rack[1-2]-n[3-4]", "rack1-n3"),
            ("n[4,1-2]", "n4"),
            ("single", "single"),
        ] {
            assert_eq!(first_host(list).unwrap(), first, "{list}");
        }
        for bad in ["", "node[1-2", "node]1", "[]", "n[a-b]", "n[[1]]"] {
            assert!(first_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_rank_takes_its_own_gpu() {
        let rank = |local_rank, srun| DistEnv { local_rank, srun, ..DistEnv::alone() };
        // torchrun's ranks see every GPU; each of srun's may see its own alone.
        assert_eq!(rank(3, false).gpu(8).unwrap(), 3);
        assert_eq!(rank(3, true).gpu(8).unwrap(), 3);
        assert_eq!(rank(3, true).gpu(1).unwrap(), 0);
        assert_eq!(rank(0, false).gpu(1).unwrap(), 0);
        // Two of torchrun's ranks on a machine of one GPU would both take it.
        assert!(rank(1, false).gpu(1).unwrap_err().to_string().contains("local rank 1 sees 1 GPU(s)"));
        assert!(rank(2, true).gpu(2).is_err());
    }
}
