//! The process group through the shim.

use super::{Backend, DistEnv};
use anyhow::{bail, ensure, Context, Result};
use std::os::raw::{c_char, c_int};
use std::ptr::NonNull;
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

#[repr(C)]
struct VaePg {
    _private: [u8; 0],
}

extern "C" {
    fn vae_pg_new(
        host: *const c_char,
        port: *mut c_int,
        serve: c_int,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        timeout_ms: c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> *mut VaePg;
    fn vae_pg_allreduce_sum(
        pg: *mut VaePg,
        t: *mut *mut C_tensor,
        n: usize,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_pg_broadcast(
        pg: *mut VaePg,
        t: *mut *mut C_tensor,
        n: usize,
        root: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_pg_store_set(pg: *mut VaePg, key: *const c_char, err: *mut c_char, len: usize) -> c_int;
    fn vae_pg_store_wait(
        pg: *mut VaePg,
        key: *const c_char,
        timeout_ms: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_pg_free(pg: *mut VaePg);
}

#[cfg(vae_nccl)]
extern "C" {
    fn vae_pg_new_nccl(
        host: *const c_char,
        port: *mut c_int,
        serve: c_int,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        device: c_int,
        timeout_ms: c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> *mut VaePg;
}

const ERR_LEN: usize = 1024;

/// The size of one exchange: PyTorch DDP's default bucket (25 MiB), large enough to amortise
/// a collective's latency, small enough not to double a big model's memory.
const BUCKET_BYTES: usize = 25 << 20;

/// The C++ error message the shim wrote, without c10's stack of C++ frames.
fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]);
    text.split("\nException raised from").next().unwrap_or_default().trim_end().to_owned()
}

/// A process group (Gloo or NCCL): every rank of a run holds one.
pub struct ProcessGroup {
    ptr: NonNull<VaePg>,
    pub rank: usize,
    pub world: usize,
    /// The store's port (the one picked, when rank 0 asked for port 0).
    pub port: u16,
    /// Where the exchanged buffers live: the GPU for NCCL, the host for Gloo.
    device: Device,
    /// How long a rank waits for the others (`--dist-timeout`), in c10d's milliseconds.
    timeout_ms: c_int,
}

// SAFETY: c10d's groups may be used from any thread; ours is used by one at a time.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the run at `env` (hosting its store when rank 0 serves; port 0 there picks a free
    /// one) and forms the `backend` group over tensors on `device`, waiting up to `timeout` for
    /// the other ranks.
    pub fn connect(env: &DistEnv, backend: Backend, device: Device, timeout: Duration) -> Result<Self> {
        backend.check(device)?;
        let DistEnv { rank, world, ref master_addr, master_port, .. } = *env;
        let c_host = std::ffi::CString::new(master_addr.as_str()).context("MASTER_ADDR holds a NUL byte")?;
        let c_prefix = std::ffi::CString::new(env.store_prefix()).expect("no NUL in a number");
        let mut c_port = master_port as c_int;
        let mut err = [0u8; ERR_LEN];
        let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
        let (host, port, serve) = (c_host.as_ptr(), &mut c_port as *mut c_int, env.serves() as c_int);
        let prefix = c_prefix.as_ptr();
        let (rank_c, world_c, buf) = (rank as c_int, world as c_int, err.as_mut_ptr().cast());
        // SAFETY (both): every pointer outlives the call; the shim copies what it keeps.
        let gloo =
            || unsafe { vae_pg_new(host, port, serve, prefix, rank_c, world_c, timeout_ms, buf, ERR_LEN) };
        #[cfg(vae_nccl)]
        let ptr = match (backend, device) {
            (Backend::Nccl, Device::Cuda(gpu)) => unsafe {
                vae_pg_new_nccl(
                    host,
                    port,
                    serve,
                    prefix,
                    rank_c,
                    world_c,
                    gpu as c_int,
                    timeout_ms,
                    buf,
                    ERR_LEN,
                )
            },
            _ => gloo(),
        };
        #[cfg(not(vae_nccl))]
        let ptr = gloo();
        let Some(ptr) = NonNull::new(ptr) else {
            bail!(
                "rank {rank} of {world} could not join the {backend:?} process group at {master_addr}:{master_port}: {}",
                message(&err)
            );
        };
        let device = if backend == Backend::Nccl { device } else { Device::Cpu };
        Ok(Self { ptr, rank, world, port: c_port as u16, device, timeout_ms })
    }

    /// Sums each of `tensors` over the ranks, in place.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.bucketed(tensors, |flat| {
            // SAFETY: `t` holds `n` live tensors for the duration of the call.
            self.call("all-reduce", flat, |pg, t, n, err| unsafe {
                vae_pg_allreduce_sum(pg, t, n, err, ERR_LEN)
            })
        })
    }

    /// Copies rank `root`'s `tensors` into every rank's, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let root = root as c_int;
        self.bucketed(tensors, |flat| {
            // SAFETY: as in all_reduce_sum.
            self.call("broadcast", flat, |pg, t, n, err| unsafe {
                vae_pg_broadcast(pg, t, n, root, err, ERR_LEN)
            })
        })
    }

    /// Returns once every rank has called it: a one-number all-reduce, which every backend
    /// has on the group's own device (NCCL's barrier would have to guess the GPU).
    pub fn barrier(&self) -> Result<()> {
        let token = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce_sum(std::slice::from_ref(&token))?;
        // NCCL only queues the collective: wait for it on the host.
        token.double_value(&[0]);
        Ok(())
    }

    /// Sets `key` in the run's store, for the ranks in [`Self::wait_for`].
    pub fn announce(&self, key: &str) -> Result<()> {
        let key = std::ffi::CString::new(key).expect("no NUL in a key");
        let mut err = [0u8; ERR_LEN];
        // SAFETY: both buffers outlive the call.
        let status =
            unsafe { vae_pg_store_set(self.ptr.as_ptr(), key.as_ptr(), err.as_mut_ptr().cast(), ERR_LEN) };
        ensure!(
            status == 0,
            "rank {} of {} could not reach the store: {}",
            self.rank,
            self.world,
            message(&err)
        );
        Ok(())
    }

    /// Returns once a rank has announced `key`, however long that takes while the store's host
    /// is there: rank 0's work alone (decoding an image folder) may outlast `--dist-timeout`,
    /// which a collective would not wait out. `waiting` hears each time another timeout's
    /// length has passed, with the time so far.
    pub fn wait_for(&self, key: &str, mut waiting: impl FnMut(Duration)) -> Result<()> {
        let started = std::time::Instant::now();
        let c_key = std::ffi::CString::new(key).expect("no NUL in a key");
        loop {
            let mut err = [0u8; ERR_LEN];
            // SAFETY: both buffers outlive the call.
            let status = unsafe {
                vae_pg_store_wait(
                    self.ptr.as_ptr(),
                    c_key.as_ptr(),
                    self.timeout_ms,
                    err.as_mut_ptr().cast(),
                    ERR_LEN,
                )
            };
            match status {
                0 => return Ok(()),
                2 => waiting(started.elapsed()),
                _ => bail!(
                    "rank {} of {} lost the store while waiting for {key}: {}",
                    self.rank,
                    self.world,
                    message(&err)
                ),
            }
        }
    }

    /// Runs `collective` on `tensors` (one kind) end to end in flat buffers of about
    /// BUCKET_BYTES on the group's device, one call per buffer (c10d takes one tensor per
    /// call and device), and copies the results back into them.
    fn bucketed(
        &self,
        tensors: &[Tensor],
        mut collective: impl FnMut(&mut Tensor) -> Result<()>,
    ) -> Result<()> {
        tch::no_grad(|| {
            let mut rest = tensors;
            while !rest.is_empty() {
                let mut bytes = 0;
                let count = rest
                    .iter()
                    .take_while(|t| {
                        bytes += t.numel() * t.kind().elt_size_in_bytes();
                        bytes <= BUCKET_BYTES
                    })
                    .count()
                    .max(1);
                let (chunk, tail) = rest.split_at(count);
                let parts: Vec<Tensor> = chunk.iter().map(|t| t.flatten(0, -1)).collect();
                let mut flat = Tensor::cat(&parts, 0).to_device(self.device);
                collective(&mut flat)?;
                let mut offset = 0;
                for t in chunk {
                    let n = t.numel() as i64;
                    t.shallow_clone().copy_(&flat.narrow(0, offset, n).view_as(t));
                    offset += n;
                }
                rest = tail;
            }
            Ok(())
        })
    }

    fn call(
        &self,
        what: &str,
        tensor: &mut Tensor,
        f: impl FnOnce(*mut VaePg, *mut *mut C_tensor, usize, *mut c_char) -> c_int,
    ) -> Result<()> {
        let mut ptr = tensor.as_mut_ptr();
        let mut err = [0u8; ERR_LEN];
        let status = f(self.ptr.as_ptr(), &mut ptr, 1, err.as_mut_ptr().cast());
        ensure!(status == 0, "{what} on rank {} of {} failed: {}", self.rank, self.world, message(&err));
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: made by vae_pg_new, freed once, here.
        unsafe { vae_pg_free(self.ptr.as_ptr()) }
    }
}
