// The c10d pieces vae uses, behind a C ABI for Rust: a TCPStore rendezvous and a Gloo process
// group (NCCL's is in nccl.cpp), with all-reduce, broadcast and barrier on tensors that tch
// owns (`at::Tensor*`). Every call catches C++ exceptions and returns their message instead.
#include "shim.h"
#include "../tensor_list.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <c10/util/Logging.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

void vae_set_error(char* err, size_t len, const char* what) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, what, len - 1);
    err[len - 1] = '\0';
  }
}

c10::intrusive_ptr<c10d::Store> vae_store(const char* host, int* port, int serve, int world,
                                          int timeout_ms, const char* prefix) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(*port);
  opts.isServer = serve != 0;
  opts.numWorkers = world;
  opts.waitWorkers = false;
  opts.timeout = std::chrono::milliseconds(timeout_ms);
  auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
  *port = store->getPort();
  if (*prefix == '\0') {
    return store;
  }
  return c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
}

extern "C" {

// Joins (rank 0 with `serve` set: hosts) the store at host:port, then forms the Gloo group of
// `world` ranks, its keys under `prefix` (none when empty). `port` 0 with `serve` picks a free
// port, written back into `*port`.
vae_pg* vae_pg_new(const char* host, int* port, int serve, const char* prefix, int rank, int world,
                   int timeout_ms, char* err, size_t errlen) {
  try {
    auto store = vae_store(host, port, serve, world, timeout_ms, prefix);
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    std::string address(host);
    if (ifname != nullptr && *ifname != '\0') {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (address == "127.0.0.1" || address == "localhost") {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    c10::intrusive_ptr<c10d::Backend> group =
        c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    return new vae_pg{store, group};
  } catch (const std::exception& e) {
    vae_set_error(err, errlen, e.what());
    return nullptr;
  }
}

// Sums each tensor over the ranks, in place.
int vae_pg_allreduce_sum(vae_pg* pg, at::Tensor** tensors, size_t n, char* err, size_t errlen) {
  try {
    auto list = vae_tensor_list(tensors, n);
    pg->group->allreduce(list)->wait();
    return 0;
  } catch (const std::exception& e) {
    vae_set_error(err, errlen, e.what());
    return 1;
  }
}

// Copies rank `root`'s tensors into every rank's, in place.
int vae_pg_broadcast(vae_pg* pg, at::Tensor** tensors, size_t n, int root, char* err, size_t errlen) {
  try {
    auto list = vae_tensor_list(tensors, n);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    pg->group->broadcast(list, opts)->wait();
    return 0;
  } catch (const std::exception& e) {
    vae_set_error(err, errlen, e.what());
    return 1;
  }
}

// Sets `key` in the group's store.
int vae_pg_store_set(vae_pg* pg, const char* key, char* err, size_t errlen) {
  try {
    pg->store->set(std::string(key), std::vector<uint8_t>{1});
    return 0;
  } catch (const std::exception& e) {
    vae_set_error(err, errlen, e.what());
    return 1;
  }
}

// Waits up to `timeout_ms` for `key` in the group's store: 0 once it is set, 2 when the time
// ran out (the store still answering), 1 on any other failure (its host gone).
int vae_pg_store_wait(vae_pg* pg, const char* key, int timeout_ms, char* err, size_t errlen) {
  // The time running out is how the caller keeps count, not a fault: c10d's warnings about
  // it are held back (errors still show).
  struct Quieter {
    int before = FLAGS_caffe2_log_level;
    Quieter() { FLAGS_caffe2_log_level = std::max(before, 2); }
    ~Quieter() { FLAGS_caffe2_log_level = before; }
  } quieter;
  try {
    pg->store->wait({std::string(key)}, std::chrono::milliseconds(timeout_ms));
    return 0;
  } catch (const c10::DistStoreError& e) {
    vae_set_error(err, errlen, e.what());
    return 2;
  } catch (const std::exception& e) {
    vae_set_error(err, errlen, e.what());
    return 1;
  }
}

// Ends the group cleanly (NCCL wants it before destruction), then frees the handle.
void vae_pg_free(vae_pg* pg) {
  try {
    pg->group->shutdown();
  } catch (const std::exception&) {
    // Exiting anyway: nothing to report to.
  }
  delete pg;
}

}  // extern "C"
