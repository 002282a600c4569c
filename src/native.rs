//! ATen calls that tch does not bind (src/native.cpp): multi-tensor kernels and fused Adam,
//! which touch every parameter in a few launches where a loop of tch calls makes several per
//! tensor (on a GPU the launches, not the arithmetic, bound a small model's step), dropping
//! gradients (`set_to_none`), and the CUDA caching allocator's peak-memory counter.
//!
//! The wrappers panic on a libtorch error, as tch's own non-`f_` methods do: these calls fail
//! only on a broken invariant (tensors on different devices or of different sizes).

use std::os::raw::{c_char, c_int};
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
    fn vae_cuda_peak_bytes(
        device: c_int,
        reset: c_int,
        bytes: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

const ERR_LEN: usize = 1024;

/// Runs one shim call with an error buffer; panics with libtorch's message if it failed.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) {
    let mut err = [0u8; ERR_LEN];
    if f(err.as_mut_ptr().cast(), ERR_LEN) != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(ERR_LEN);
        let text = String::from_utf8_lossy(&err[..end]);
        panic!("{what}: {}", text.split("\nException raised from").next().unwrap_or_default());
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
    fn no_peak_memory_off_cuda() {
        assert_eq!(cuda_peak_mib(Device::Cpu, true), None);
    }
}
