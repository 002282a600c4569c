// ATen calls that tch 0.24 does not bind, behind a C ABI for Rust (src/native.rs): the
// multi-tensor ("foreach") kernels and fused Adam, which update every parameter in a few
// launches instead of several per tensor (on a GPU those launches, not the arithmetic, bound a
// small model's step), dropping gradients, LeakyReLU's slope, the caching allocator's
// peak-memory counter, libtorch's profiler, and activation checkpointing (a custom autograd
// function that calls back into Rust). Tensors are the `at::Tensor*` that tch owns. Every
// call catches C++ exceptions and returns their message.
#include "tensor_list.h"

#include <ATen/ATen.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <set>
#include <stdexcept>
#include <string>
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

// A segment of a network as Rust hands it over: `run` computes the segment on a tensor into a
// new at::Tensor (or writes an error and returns non-zero); `drop` frees the closure.
using SegmentRun = int (*)(void* closure, const at::Tensor* input, at::Tensor** output, char* err, size_t len);
using SegmentDrop = void (*)(void* closure);

// Owns the Rust closure for as long as the autograd graph that may call it lives.
struct Segment : torch::CustomClassHolder {
  Segment(void* closure, SegmentRun run, SegmentDrop drop) : closure(closure), run_fn(run), drop_fn(drop) {}
  ~Segment() override { drop_fn(closure); }
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  at::Tensor run(const at::Tensor& input) const {
    char err[1024] = {0};
    at::Tensor* out = nullptr;
    if (run_fn(closure, &input, &out, err, sizeof err) != 0) throw std::runtime_error(err);
    at::Tensor result = std::move(*out);
    delete out;
    return result;
  }

  void* closure;
  SegmentRun run_fn;
  SegmentDrop drop_fn;
};

// torch.utils.checkpoint's reentrant form: the forward keeps only the segment's input; the
// backward computes the segment again with autograd on and back-propagates through it, which
// accumulates its parameters' gradients and returns the input's.
struct Checkpoint : torch::autograd::Function<Checkpoint> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const c10::intrusive_ptr<Segment>& segment) {
    ctx->save_for_backward({input});
    ctx->saved_data["segment"] = c10::IValue::make_capsule(segment);
    return segment->run(input);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    auto segment = c10::static_intrusive_pointer_cast<Segment>(ctx->saved_data["segment"].toCapsule());
    auto input = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    at::Tensor output;
    {
      at::AutoGradMode on(true);
      output = segment->run(input);
    }
    torch::autograd::backward({output}, {grads[0]});
    return {input.grad(), at::Tensor()};
  }
};

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

// torch.use_deterministic_algorithms(True) with torch.backends.cudnn.deterministic = True and
// cuDNN's benchmark off, where `enable`: every operator in its deterministic kernel, one without
// any throwing when it runs. `now`: whether deterministic algorithms are on.
int vae_deterministic(int enable, int* now, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto& context = at::globalContext();
    if (enable != 0) {
      context.setDeterministicAlgorithms(true, /*warn_only=*/false);
      context.setDeterministicCuDNN(true);
      context.setBenchmarkCuDNN(false);
    }
    *now = context.deterministicAlgorithms() ? 1 : 0;
  });
}

// Starts libtorch's profiler (Kineto, the engine of torch.profiler): every operator on this
// thread and on autograd's threads from now on, and with `cuda` every CUDA kernel and copy.
int vae_trace_start(int cuda, char* err, size_t len) {
  return guarded(err, len, [&] {
    using torch::profiler::impl::ActivityType;
    torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda != 0) activities.insert(ActivityType::CUDA);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  });
}

// Stops the profiler and writes what it recorded to `path` as a Chrome trace (JSON), as
// torch.profiler's export_chrome_trace does; a null `path` discards it.
int vae_trace_stop(const char* path, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    if (path != nullptr) result->save(path);
  });
}

// `segment(input)` into `*out`, through [`Checkpoint`] when autograd records and `input`
// needs a gradient (else directly: nothing to keep). Takes the closure in every case: it is
// freed with the graph, or before returning.
int vae_checkpoint(const at::Tensor* input, void* closure, SegmentRun run, SegmentDrop drop, at::Tensor** out,
                   char* err, size_t len) {
  auto segment = c10::make_intrusive<Segment>(closure, run, drop);
  return guarded(err, len, [&] {
    bool record = at::GradMode::is_enabled() && input->requires_grad();
    *out = new at::Tensor(record ? Checkpoint::apply(*input, segment) : segment->run(*input));
  });
}
}
