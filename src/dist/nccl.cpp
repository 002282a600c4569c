// The NCCL half of the c10d shim (see shim.h): compiled with USE_C10D_NCCL and the CUDA
// headers, only when build.rs finds them. Collectives go through shim.cpp's Backend calls.
#include "shim.h"

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <exception>

extern "C" {

// As vae_pg_new, with an NCCL group on the GPU `device` (the rank's local GPU).
vae_pg* vae_pg_new_nccl(const char* host, int* port, int serve, const char* prefix, int rank,
                        int world, int device, int timeout_ms, char* err, size_t errlen) {
  try {
    auto store = vae_store(host, port, serve, world, timeout_ms, prefix);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Backend> group =
        c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
    // Bound to its GPU, the group makes its communicator now (an error shows at start, not at
    // the first step), as init_process_group(device_id=...) does.
    at::Device gpu(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    group->setBoundDeviceId(gpu);
    group->eagerConnectSingleDevice(gpu);
    return new vae_pg{store, group};
  } catch (const std::exception& e) {
    vae_set_error(err, errlen, e.what());
    return nullptr;
  }
}

}  // extern "C"
