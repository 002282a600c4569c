//! ATen calls that tch does not bind (src/native.cpp): multi-tensor kernels and fused Adam,
//! which touch every parameter in a few launches where a loop of tch calls makes several per
//! tensor (on a GPU the launches, not the arithmetic, bound a small model's step), dropping
//! gradients (`set_to_none`), the CUDA caching allocator's peak-memory counter, libtorch's
//! profiler ([`Trace`]), activation checkpointing ([`checkpoint`]), and the deterministic
//! mode ([`set_deterministic`]).
//!
//! The wrappers panic on a libtorch error, as tch's own non-`f_` methods do: these calls fail
//! only on a broken invariant (tensors on different devices or of different sizes).

use anyhow::{bail, ensure, Context, Result};
use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn vae_clear_grads(t: *mut *mut C_tensor, n: usize, err: *mut c_char, len: usize) -> c_int;
    fn vae_leaky_relu_(t: *mut C_tensor, slope: f64, err: *mut c_char, len: usize) -> c_int;
    fn vae_foreach_mul(
        t: *mut *mut C_tensor,
        n: usize,
        factor: *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_foreach_lerp(
        t: *mut *mut C_tensor,
        ends: *mut *mut C_tensor,
        n: usize,
        weight: f64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_foreach_norm(
        t: *mut *mut C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_fused_adam(
        params: *mut *mut C_tensor,
        grads: *mut *mut C_tensor,
        exp_avgs: *mut *mut C_tensor,
        exp_avg_sqs: *mut *mut C_tensor,
        n: usize,
        step: *mut C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_deterministic(enable: c_int, now: *mut c_int, err: *mut c_char, len: usize) -> c_int;
    fn vae_cuda_peak_bytes(
        device: c_int,
        reset: c_int,
        bytes: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_checkpoint(
        input: *const C_tensor,
        closure: *mut c_void,
        run: SegmentRun,
        drop: unsafe extern "C" fn(*mut c_void),
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn vae_trace_start(cuda: c_int, err: *mut c_char, len: usize) -> c_int;
    fn vae_trace_stop(path: *const c_char, err: *mut c_char, len: usize) -> c_int;
}

const ERR_LEN: usize = 1024;

/// Runs one shim call with an error buffer; libtorch's message if it failed.
fn try_call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = [0u8; ERR_LEN];
    if f(err.as_mut_ptr().cast(), ERR_LEN) != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(ERR_LEN);
        let text = String::from_utf8_lossy(&err[..end]);
        bail!("{what}: {}", text.split("\nException raised from").next().unwrap_or_default());
    }
    Ok(())
}

/// [`try_call`] for the calls that fail only on a broken invariant: panics with the message.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) {
    if let Err(e) = try_call(what, f) {
        panic!("{e:#}");
    }
}

/// The handles of `tensors`, for a call that reads them while they are borrowed.
fn handles<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Vec<*mut C_tensor> {
    // In-place kernels change the tensors' data, never the handles.
    tensors.into_iter().map(|t| t.as_ptr().cast_mut()).collect()
}

/// Drops the gradients of `params` (PyTorch's `zero_grad(set_to_none=True)`): the memory is
/// free until the next backward, which gives each parameter its gradient afresh.
pub fn clear_grads<'a>(params: impl IntoIterator<Item = &'a Tensor>) {
    let mut t = handles(params);
    // SAFETY: the handles stay valid while the tensors are borrowed; the shim copies nothing.
    call("clear_grads", |err, len| unsafe { vae_clear_grads(t.as_mut_ptr(), t.len(), err, len) });
}

/// Multiplies every tensor in place by the scalar tensor `factor` (no host sync).
pub fn mul_(tensors: &[Tensor], factor: &Tensor) {
    let mut t = handles(tensors);
    // SAFETY: as in clear_grads.
    call("_foreach_mul_", |err, len| unsafe {
        vae_foreach_mul(t.as_mut_ptr(), t.len(), factor.as_ptr().cast_mut(), err, len)
    });
}

/// `tensors[i] += weight * (ends[i] - tensors[i])` in place.
pub fn lerp_(tensors: &[Tensor], ends: &[Tensor], weight: f64) {
    assert_eq!(tensors.len(), ends.len(), "lerp_ of lists of different lengths");
    let (mut t, mut e) = (handles(tensors), handles(ends));
    // SAFETY: as in clear_grads.
    call("_foreach_lerp_", |err, len| unsafe {
        vae_foreach_lerp(t.as_mut_ptr(), e.as_mut_ptr(), t.len(), weight, err, len)
    });
}

/// `x` through LeakyReLU with negative `slope`, in place (as `nn.LeakyReLU(slope, True)`).
pub fn leaky_relu_(x: &Tensor, slope: f64) {
    // SAFETY: the handle is a live tensor tch owns, used only for this call.
    call("leaky_relu_", |err, len| unsafe { vae_leaky_relu_(x.as_ptr().cast_mut(), slope, err, len) });
}

/// The L2 norm of all of `tensors` together, as `torch.nn.utils.clip_grad_norm_` computes it;
/// a 0-dim tensor on their device. `tensors` must not be empty.
pub fn norm(tensors: &[Tensor]) -> Tensor {
    let mut t = handles(tensors);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: as in clear_grads; on success the shim hands over a new tensor that we own.
    call("_foreach_norm", |err, len| unsafe {
        vae_foreach_norm(t.as_mut_ptr(), t.len(), &mut out, err, len)
    });
    // SAFETY: `out` was allocated by the shim as an at::Tensor, as tch's own calls do.
    unsafe { Tensor::from_ptr(out) }
}

/// The scalars of [`adam_`]: torch.optim.Adam's, with L2 weight decay.
#[derive(Debug, Clone, Copy)]
pub struct AdamScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One Adam update of every parameter by `torch.optim.Adam(fused=True)`'s kernel; `step` is a
/// float tensor on their device holding the update count (bias corrections included).
pub fn adam_(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: &Tensor,
    s: AdamScalars,
) {
    let n = params.len();
    assert!(
        grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n,
        "adam_ of lists of different lengths"
    );
    let (mut p, mut g, mut m, mut v) =
        (handles(params), handles(grads), handles(exp_avgs), handles(exp_avg_sqs));
    // SAFETY: as in clear_grads.
    call("_fused_adam_", |err, len| unsafe {
        vae_fused_adam(
            p.as_mut_ptr(),
            g.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            n,
            step.as_ptr().cast_mut(),
            s.lr,
            s.beta1,
            s.beta2,
            s.weight_decay,
            s.eps,
            err,
            len,
        )
    });
}

/// The most memory the CUDA caching allocator has handed out on `device` since the last
/// reset, in MiB (`torch.cuda.max_memory_allocated`); None off CUDA. With `reset`, a new peak
/// starts after the reading.
pub fn cuda_peak_mib(device: Device, reset: bool) -> Option<f64> {
    let Device::Cuda(index) = device else { return None };
    let mut bytes = 0i64;
    // SAFETY: plain values and an out-pointer that outlives the call.
    call("CUDA memory stats", |err, len| unsafe {
        vae_cuda_peak_bytes(index as c_int, reset as c_int, &mut bytes, err, len)
    });
    Some(bytes as f64 / (1u64 << 20) as f64)
}

/// Turns libtorch's deterministic mode on: every operator in its deterministic kernel
/// (cuDNN's included, its benchmark off), one that has none refused when it runs.
pub fn set_deterministic() {
    deterministic_mode(true);
}

/// Whether libtorch's deterministic mode is on.
pub fn is_deterministic() -> bool {
    deterministic_mode(false)
}

/// Turns the mode on where `enable`; whether it is on.
fn deterministic_mode(enable: bool) -> bool {
    let mut now = 0;
    // SAFETY: plain values and an out-pointer that outlives the call.
    call("deterministic mode", |err, len| unsafe { vae_deterministic(enable.into(), &mut now, err, len) });
    now != 0
}

/// A segment of a network for [`checkpoint`]: it may run on autograd's thread (CUDA's
/// backward), hence `Send`.
type Segment = Box<dyn Fn(&Tensor) -> Tensor + Send>;

type SegmentRun =
    unsafe extern "C" fn(*mut c_void, *const C_tensor, *mut *mut C_tensor, *mut c_char, usize) -> c_int;

/// `f(x)` keeping only `x` for the backward, which computes `f` again to back-propagate
/// through it (torch.utils.checkpoint, reentrant): a segment's activations are held one
/// segment at a time, for a second forward's compute. The result and every gradient are those
/// of `f(x)` itself, provided `f` is deterministic (no random draws). Gradients reach `f`'s
/// parameters only if `x` requires a gradient; without one, or under `no_grad`, it is `f(x)`.
pub fn checkpoint(x: &Tensor, f: impl Fn(&Tensor) -> Tensor + Send + 'static) -> Tensor {
    let closure = Box::into_raw(Box::new(Box::new(f) as Segment));
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `closure` passes to the shim, which frees it through `drop_segment` exactly
    // once (with the graph, or before returning); on success `out` is a new tensor we own.
    call("checkpoint", |err, len| unsafe {
        vae_checkpoint(x.as_ptr(), closure.cast(), run_segment, drop_segment, &mut out, err, len)
    });
    // SAFETY: allocated by the shim as an at::Tensor, as tch's own calls do.
    unsafe { Tensor::from_ptr(out) }
}

/// The shim's call of a [`Segment`]: its result in `*out`, or a panic's message in `err`.
unsafe extern "C" fn run_segment(
    closure: *mut c_void,
    input: *const C_tensor,
    out: *mut *mut C_tensor,
    err: *mut c_char,
    len: usize,
) -> c_int {
    // SAFETY: `closure` is the live Segment the shim holds; `input` a tensor the shim owns for
    // the call, which the handle must not free (ManuallyDrop).
    let (f, input) = unsafe {
        (&*closure.cast::<Segment>(), std::mem::ManuallyDrop::new(Tensor::from_ptr(input.cast_mut())))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input))) {
        Ok(output) => {
            let output = std::mem::ManuallyDrop::new(output);
            // SAFETY: the shim takes the handle over and frees it.
            unsafe { *out = output.as_ptr().cast_mut() };
            0
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            if len > 0 {
                let bytes = &text.as_bytes()[..text.len().min(len - 1)];
                // SAFETY: `err` holds `len` bytes; the copy and its NUL fit.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), err.cast::<u8>(), bytes.len());
                    *err.add(bytes.len()) = 0;
                }
            }
            1
        }
    }
}

/// Frees a [`Segment`] the shim held.
unsafe extern "C" fn drop_segment(closure: *mut c_void) {
    // SAFETY: made by Box::into_raw in `checkpoint`, freed once.
    drop(unsafe { Box::from_raw(closure.cast::<Segment>()) });
}

/// libtorch's profiler (Kineto, the engine of torch.profiler) from [`Trace::start`] to
/// [`Trace::save`]: what each operator cost on the host and, on CUDA, each kernel on the
/// device, as a Chrome trace (Perfetto, chrome://tracing, scripts/trace_summary.py). Dropped
/// unsaved, it stops the profiler and keeps nothing.
pub struct Trace {
    running: bool,
}

impl Trace {
    /// Starts recording; on CUDA devices the kernels too. One trace at a time per process.
    pub fn start(device: Device) -> Result<Self> {
        // SAFETY: plain values and the error buffer.
        try_call("starting the profiler", |err, len| unsafe {
            vae_trace_start(device.is_cuda() as c_int, err, len)
        })?;
        Ok(Self { running: true })
    }

    /// Stops recording and writes the trace to `path`, which must not exist yet: Kineto fills
    /// a temporary file beside it, which then takes the name only if nothing else has.
    pub fn save(mut self, path: &Path) -> Result<()> {
        self.running = false;
        let tmp = crate::fsio::temporary_path(path)?;
        let name = CString::new(tmp.as_os_str().as_bytes()).context("a trace path with a NUL byte")?;
        // SAFETY: a NUL-terminated path that outlives the call.
        let written = try_call("writing the profiler's trace", |err, len| unsafe {
            vae_trace_stop(name.as_ptr(), err, len)
        })
        .and_then(|()| {
            // Kineto logs, rather than throws, when it cannot create the file.
            ensure!(tmp.is_file(), "the profiler could not write {}", tmp.display());
            std::fs::hard_link(&tmp, path).with_context(|| format!("writing the trace to {}", path.display()))
        });
        let _ = std::fs::remove_file(&tmp);
        written
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if self.running {
            // SAFETY: a null path: the shim stops the profiler and discards what it recorded.
            call("stopping the profiler", |err, len| unsafe { vae_trace_stop(std::ptr::null(), err, len) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Fixed values for `seed` (no draw from libtorch's generator, which tests running in
    /// parallel threads share).
    fn tensors(seed: i64) -> Vec<Tensor> {
        [vec![3, 4], vec![7], vec![2, 3, 5]]
            .into_iter()
            .map(|s| {
                let n: i64 = s.iter().product();
                (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.7 + seed as f64)).sin().view(s.as_slice())
            })
            .collect()
    }

    fn equal(a: &[Tensor], b: &[Tensor]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.equal(y))
    }

    #[test]
    fn foreach_kernels_equal_one_op_per_tensor() {
        let (ends, factor) = (tensors(1), Tensor::from(0.25f32));
        let ours = tensors(0);
        lerp_(&ours, &ends, 0.3);
        mul_(&ours, &factor);
        let eager: Vec<Tensor> =
            tensors(0).iter().zip(&ends).map(|(t, e)| t.lerp(e, 0.3) * &factor).collect();
        assert!(equal(&ours, &eager), "lerp_/mul_ differ from the per-tensor ops");
        assert!(!equal(&ours, &tensors(0)), "nothing changed");

        let flat = Tensor::cat(&eager.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
        let worst = (norm(&ours) - flat.norm()).abs().double_value(&[]);
        assert!(worst < 1e-6, "norm differs by {worst}");
    }

    #[test]
    fn cleared_gradients_are_undefined_and_come_back_fresh() {
        let params: Vec<Tensor> = tensors(0).into_iter().map(|t| t.set_requires_grad(true)).collect();
        let loss =
            |k: f64| params.iter().map(|p| p.sum(Kind::Float) * k).fold(Tensor::from(0f32), |a, b| a + b);
        loss(2.0).backward();
        assert!(params.iter().all(|p| p.grad().defined()));
        clear_grads(&params);
        assert!(params.iter().all(|p| !p.grad().defined()), "a gradient survived");
        // Not added to the old ones: the new backward's alone.
        loss(3.0).backward();
        assert!(params.iter().all(|p| p.grad().equal(&p.ones_like().detach().fill_(3.0))));
    }

    #[test]
    fn a_checkpointed_segment_gives_the_same_values_and_gradients() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::sync::Arc;
        let weight = tensors(1)[0].set_requires_grad(true); // [3, 4]
        let calls = Arc::new(AtomicUsize::new(0));
        let segment = |w: Tensor| {
            let calls = Arc::clone(&calls);
            move |x: &Tensor| {
                calls.fetch_add(1, SeqCst);
                x.matmul(&w.tr()).tanh().matmul(&w).sin()
            }
        };
        let run = |checkpointed: bool| {
            let x = tensors(0)[0].set_requires_grad(true); // [3, 4]
            let y = if checkpointed {
                checkpoint(&x, segment(weight.shallow_clone()))
            } else {
                segment(weight.shallow_clone())(&x)
            };
            (y.square().sum(Kind::Float) * 3.0).backward();
            let grads = (x.grad(), weight.grad().copy());
            clear_grads([&weight]);
            (y.detach(), grads)
        };
        let (y, (dx, dw)) = run(false);
        assert_eq!(calls.swap(0, SeqCst), 1);
        let (y_c, (dx_c, dw_c)) = run(true);
        // Run without a graph, then again for the backward.
        assert_eq!(calls.swap(0, SeqCst), 2);
        assert!(y.equal(&y_c) && dx.equal(&dx_c) && dw.equal(&dw_c), "checkpointing changed a value");
        assert!(dx.abs().sum(Kind::Float).double_value(&[]) > 0.0);

        // No gradient wanted: the segment runs as it is, and nothing is recorded.
        let plain = tensors(0)[0].set_requires_grad(true);
        let y = tch::no_grad(|| checkpoint(&plain, segment(weight.shallow_clone())));
        assert!(!y.requires_grad());
        // A panic in the segment is an error with its message, not an abort.
        let failed =
            std::panic::catch_unwind(|| checkpoint(&tensors(0)[0], |_: &Tensor| panic!("no such layer")));
        let message = failed.unwrap_err();
        let message = message.downcast_ref::<String>().map(String::as_str).unwrap_or_default();
        assert!(message.contains("no such layer"), "{message}");
    }

    /// The only test that starts the profiler (one per process at a time).
    #[test]
    fn a_trace_holds_the_operators_run_while_it_records_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        // Dropped unsaved: the profiler stops, so the next start succeeds.
        let discarded = Trace::start(Device::Cpu).unwrap();
        let _ = tensors(0)[0].matmul(&tensors(1)[0].tr());
        drop(discarded);
        let trace = Trace::start(Device::Cpu).unwrap();
        let _ = tensors(0)[0].matmul(&tensors(1)[0].tr());
        trace.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let names: Vec<&str> =
            json["traceEvents"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
        assert!(names.contains(&"aten::mm"), "no aten::mm in {names:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left");

        let again = Trace::start(Device::Cpu).unwrap();
        let err = again.save(&path).unwrap_err();
        assert!(format!("{err:#}").contains("trace.json"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the first trace was replaced");
    }

    #[test]
    fn no_peak_memory_off_cuda() {
        assert_eq!(cuda_peak_mib(Device::Cpu, true), None);
    }
}
