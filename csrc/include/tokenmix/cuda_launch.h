// Torch-side helpers for the CUDA launchers: dtype mapping, the current stream, launch checks.
// Included only by .cpp files of a CUDA build.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "tokenmix/dtype.h"

namespace tokenmix {

inline DType to_dtype(c10::ScalarType s) {
  switch (s) {
    case c10::ScalarType::Float:
      return DType::Float32;
    case c10::ScalarType::Half:
      return DType::Float16;
    case c10::ScalarType::BFloat16:
      return DType::BFloat16;
    case c10::ScalarType::Double:
      return DType::Float64;
    default:
      TORCH_CHECK_TYPE(false, "tokenmix: no CUDA kernel for dtype ", s);
  }
}

// The stream of the current device; callers hold a DeviceGuard for their inputs' device.
inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

inline void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "tokenmix: CUDA kernel ", kernel, " failed: ",
              cudaGetErrorString(err));
}

}  // namespace tokenmix
