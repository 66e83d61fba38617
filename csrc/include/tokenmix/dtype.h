// Element types the kernels are instantiated for. The torch-side launchers map at::ScalarType to
// this enum so that .cu files never see a torch header.
#pragma once

namespace tokenmix {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::Float16:
    case DType::BFloat16:
      return 2;
    case DType::Float64:
      return 8;
    case DType::Float32:
    default:
      return 4;
  }
}

}  // namespace tokenmix
