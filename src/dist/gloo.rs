//! The process group through the shim.

use anyhow::{bail, ensure, Context, Result};
use std::os::raw::{c_char, c_int};
use std::ptr::NonNull;
use std::time::Duration;
use tch::Tensor;
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
    fn vae_pg_barrier(pg: *mut VaePg, err: *mut c_char, len: usize) -> c_int;
    fn vae_pg_free(pg: *mut VaePg);
}

const ERR_LEN: usize = 1024;

/// The C++ error message the shim wrote.
fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A Gloo process group: every rank of a run holds one.
pub struct ProcessGroup {
    ptr: NonNull<VaePg>,
    pub rank: usize,
    pub world: usize,
    /// The store's port (the one picked, when rank 0 asked for port 0).
    pub port: u16,
}

// SAFETY: c10d's Gloo group may be used from any thread; ours is used by one at a time.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the store at host:port (hosting it when `serve`; port 0 there picks a free one)
    /// and forms the group, waiting up to `timeout` for the other ranks.
    pub fn connect_at(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        serve: bool,
        timeout: Duration,
    ) -> Result<Self> {
        let c_host = std::ffi::CString::new(host).context("MASTER_ADDR holds a NUL byte")?;
        let mut c_port = port as c_int;
        let mut err = [0u8; ERR_LEN];
        let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
        // SAFETY: every pointer outlives the call; the shim copies what it keeps.
        let ptr = unsafe {
            vae_pg_new(
                c_host.as_ptr(),
                &mut c_port,
                serve as c_int,
                rank as c_int,
                world as c_int,
                timeout_ms,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        let Some(ptr) = NonNull::new(ptr) else {
            bail!(
                "rank {rank} of {world} could not join the process group at {host}:{port}: {}",
                message(&err)
            );
        };
        Ok(Self { ptr, rank, world, port: c_port as u16 })
    }

    /// Sums `tensor` over the ranks, in place (a dense tensor: c10d reads a list as one
    /// tensor per device, so several tensors go as one flat buffer).
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        // SAFETY: `t` holds `n` live tensors for the duration of the call.
        self.call("all-reduce", tensor, |pg, t, n, err| unsafe {
            vae_pg_allreduce_sum(pg, t, n, err, ERR_LEN)
        })
    }

    /// Copies rank `root`'s `tensor` into every rank's, in place.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let root = root as c_int;
        // SAFETY: as in all_reduce_sum.
        self.call("broadcast", tensor, |pg, t, n, err| unsafe {
            vae_pg_broadcast(pg, t, n, root, err, ERR_LEN)
        })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the group is live.
        let mut nothing = Tensor::new();
        self.call("barrier", &mut nothing, |pg, _, _, err| unsafe { vae_pg_barrier(pg, err, ERR_LEN) })
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
