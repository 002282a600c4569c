// ATen calls that tch 0.24 does not bind, behind a C ABI for Rust (src/native.rs): the
// multi-tensor ("foreach") kernels and fused Adam, which update every parameter in a few
// launches instead of several per tensor (on a GPU those launches, not the arithmetic, bound a
// small model's step), dropping gradients, LeakyReLU's slope, and the caching allocator's
// peak-memory counter. Tensors are the `at::Tensor*` that tch owns. Every call catches C++
// exceptions and returns their message.
#include "tensor_list.h"

#include <ATen/ATen.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

namespace {

template <typename F>
int guarded(char* err, size_t len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr && len > 0) {
      std::strncpy(err, e.what(), len - 1);
      err[len - 1] = '\0';
    }
    return 1;
  }
}

}  // namespace

extern "C" {

// Drops the gradients of the parameters `t` (`zero_grad(set_to_none=True)`, PyTorch's
// default): their memory is free for the next forward's activations, and the next backward
// hands each parameter its gradient instead of adding it to zeros.
int vae_clear_grads(at::Tensor** t, size_t n, char* err, size_t len) {
  return guarded(err, len, [&] {
    for (size_t i = 0; i < n; ++i) t[i]->mutable_grad().reset();
  });
}

int vae_foreach_mul(at::Tensor** t, size_t n, const at::Tensor* factor, char* err, size_t len) {
  return guarded(err, len, [&] { at::_foreach_mul_(vae_tensor_list(t, n), *factor); });
}

int vae_foreach_lerp(at::Tensor** t, at::Tensor** ends, size_t n, double weight, char* err, size_t len) {
  return guarded(err, len, [&] { at::_foreach_lerp_(vae_tensor_list(t, n), vae_tensor_list(ends, n), weight); });
}

// The L2 norm of all tensors together, as a new 0-dim float tensor in `*out`.
int vae_foreach_norm(at::Tensor** t, size_t n, at::Tensor** out, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto norms = at::_foreach_norm(vae_tensor_list(t, n), 2);
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
  });
}

// In-place LeakyReLU with a given slope (tch binds only the default 0.01); autograd records it.
int vae_leaky_relu_(at::Tensor* t, double slope, char* err, size_t len) {
  return guarded(err, len, [&] { at::leaky_relu_(*t, slope); });
}

// torch.optim.Adam(fused=True)'s kernel (L2 weight decay, no AMSGrad): `step` is one float
// tensor on the parameters' device holding the update count, shared by all of them.
int vae_fused_adam(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                   size_t n, const at::Tensor* step, double lr, double beta1, double beta2, double weight_decay,
                   double eps, char* err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adam_(vae_tensor_list(params, n), vae_tensor_list(grads, n), vae_tensor_list(exp_avgs, n), vae_tensor_list(exp_avg_sqs, n), {}, steps, lr,
                     beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// The caching allocator's peak of allocated bytes on a CUDA device since the last reset
// (torch.cuda.max_memory_allocated); then, with `reset`, starts a new peak.
int vae_cuda_peak_bytes(int device, int reset, int64_t* bytes, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto index = static_cast<c10::DeviceIndex>(device);
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto stats = allocator->getDeviceStats(index);
    *bytes = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    if (reset != 0) {
      allocator->resetPeakStats(index);
    }
  });
}
}
