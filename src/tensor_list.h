// The tensors Rust hands to C++ as tch's handles (`at::Tensor*`), as the list ATen and c10d
// take; shared by src/native.cpp and src/dist/shim.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <vector>

inline std::vector<at::Tensor> vae_tensor_list(at::Tensor** tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}
