// Portability macros shared by host and device code. No torch headers: included from .cu files.
#pragma once

#if defined(__CUDACC__)
#define TM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TM_HOST_DEVICE inline
#endif

// Unroll a loop with compile-time bounds in device code (host compilers unroll on their own), or
// keep one rolled where unrolling would cost more registers than the latency it hides.
#if defined(__CUDACC__)
#define TM_UNROLL _Pragma("unroll")
#define TM_NO_UNROLL _Pragma("unroll 1")
#else
#define TM_UNROLL
#define TM_NO_UNROLL
#endif
