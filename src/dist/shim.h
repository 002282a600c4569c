// What both halves of the c10d shim share: the handle Rust holds (a store and a backend, Gloo
// or NCCL) and the store rendezvous. shim.cpp builds with Gloo's headers, nccl.cpp with CUDA's.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstddef>

struct vae_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> group;
};

// Writes `what` into the caller's buffer, cut to fit.
void vae_set_error(char* err, size_t len, const char* what);

// Joins (with `serve`: hosts) the store at host:port; port 0 with `serve` picks a free port,
// written back into `*port`. A non-empty `prefix` keeps this group's keys under it.
c10::intrusive_ptr<c10d::Store> vae_store(const char* host, int* port, int serve, int world,
                                          int timeout_ms, const char* prefix);
