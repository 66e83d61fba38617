// Device helpers shared by the CUDA kernels of every op family: launch sizing, grid-stride
// indices, device-side checks, element-type conversion to the accumulation type, warp reductions
// and the dtype switch. Torch-free; included only from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "tokenmix/dtype.h"

// CUDA's device-side assertion handler (what assert() calls in device code), declared here because
// release builds define NDEBUG, which hides glibc's declaration.
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept __attribute__((__noreturn__));

// A check on data only the device sees (index values), kept in release builds: on failure the
// kernel stops with CUDA's device-side assertion, `msg` and the source position go to stderr, and
// the CUDA context reports cudaErrorAssert from the next synchronising call on, as torch's own
// kernels do for out-of-range indices. Checking on the host instead would wait for the device.
#define TM_DEVICE_CHECK(cond, msg)                                                   \
  do {                                                                               \
    if (!(cond)) __assert_fail(msg, __FILE__, static_cast<unsigned>(__LINE__), __func__); \
  } while (0)

namespace tokenmix {
namespace cu {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

inline int blocks_for(int64_t work_items, int64_t items_per_block) {
  const int64_t n = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<int>(n < 1 ? 1 : (n > kMaxBlocks ? kMaxBlocks : n));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Element types: fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return v; }

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_log(float v) { return logf(v); }
__device__ __forceinline__ double acc_log(double v) { return log(v); }

template <typename A>
__device__ __forceinline__ A neg_inf() { return -INFINITY; }

// Largest of a and b, NaN winning, so a NaN logit gives a NaN row as in the eager formula.
template <typename A>
__device__ __forceinline__ A max_nan(A a, A b) { return (b > a || b != b) ? b : a; }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ long long warp_min(long long v) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const long long u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  return v;
}

// Whether the current device runs the fp16/bf16 tensor-core kernels: the dtype is one of those
// two and the device has compute capability >= 8.0 (bf16 MMA fragments, cp.async).
inline bool tensor_core_dtype_on_device(DType dtype) {
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         major >= 8;
}

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32:
      f(float{});
      break;
    case DType::Float16:
      f(__half{});
      break;
    case DType::BFloat16:
      f(__nv_bfloat16{});
      break;
    case DType::Float64:
      f(double{});
      break;
  }
  return cudaGetLastError();
}

}  // namespace cu
}  // namespace tokenmix
