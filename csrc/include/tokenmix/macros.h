// Portability macros shared by host and device code. No torch headers: included from .cu files.
#pragma once

#if defined(__CUDACC__)
#define TM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TM_HOST_DEVICE inline
#endif
