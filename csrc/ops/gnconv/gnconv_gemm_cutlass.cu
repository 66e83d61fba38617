// The gated GEMMs of HorNet's gnConv chain on tensor cores (CUTLASS 2.x, sm_80 code that also
// runs on sm_90).
//
// gated gemm: one CUTLASS GemmUniversalWithBroadcast per pws step. Its epilogue functor (GateOp)
//   adds the bias, multiplies by the gate (the dwconv split) and also stores the pre-gate value,
//   so a step reads its input once and writes y_i (and z_i for backward) once; in backward the
//   same GEMM shape produces dL/dz_j and dL/d(dwconv_j) from dL/dy_j without a separate pass.
//   Limits: fp16/bf16 only (fp32 would run on TF32 tensor cores and lose precision the fp32
//   contract keeps), 16-byte aligned operands, no split-K (K is at most dim here: one
//   threadblock row covers it). Tile 128x64x32: N is 64..512 and K 32..256 in HorNet, so a
//   narrow N tile wastes nothing at stage 1 and keeps enough blocks in flight at stage 4.

#include <cstdint>
#include <type_traits>

#include "gnconv_params.h"
#include "tokenmix/cuda_common.cuh"

#if defined(TOKENMIX_HAVE_CUTLASS)
#include <cutlass/array.h>
#include <cutlass/bfloat16.h>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/device/gemm_universal_with_broadcast.h>
#include <cutlass/half.h>
#include <cutlass/numeric_conversion.h>
#endif

namespace tokenmix {
namespace gnconv {

#if defined(TOKENMIX_HAVE_CUTLASS)
namespace {

constexpr int kAlign = 8;  // elements per 16-byte access for fp16/bf16

// Epilogue functor, EpilogueWithBroadcast's OutputOp concept. The broadcast vector V is the bias
// (zeros when its pointer is null); C1 is the gate, C2 the backward's `pre`.
template <typename Element, bool kTwoSources>
class GateOp {
 public:
  static bool const kIsSingleSource = !kTwoSources;
  static bool const kStoreZ = true;
  // T is stored only where its pointer is non-null (the tile iterator masks a null one off).
  static bool const kStoreT = true;
  static bool const kIsHeavy = false;
  static int const kCount = kAlign;

  using ElementOutput = Element;
  using ElementC = Element;
  using ElementZ = Element;
  using ElementT = Element;
  using ElementVector = Element;
  using ElementAccumulator = float;
  using ElementCompute = float;

  using FragmentAccumulator = cutlass::Array<float, kCount>;
  using FragmentCompute = cutlass::Array<float, kCount>;
  using FragmentC = cutlass::Array<Element, kCount>;
  using FragmentOutput = cutlass::Array<Element, kCount>;
  using FragmentZ = cutlass::Array<Element, kCount>;
  using FragmentT = cutlass::Array<Element, kCount>;

  struct Params {
    float scale;
    CUTLASS_HOST_DEVICE Params() : scale(1.0f) {}
    CUTLASS_HOST_DEVICE explicit Params(float s) : scale(s) {}
  };

  CUTLASS_HOST_DEVICE explicit GateOp(Params const& p) : scale_(p.scale) {}

  // Both forms read their sources; the epilogue then never takes the source-free path.
  CUTLASS_HOST_DEVICE bool is_source_needed() const { return true; }
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  // kForward: t = acc + bias, z = t * gate.
  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT& t, FragmentAccumulator const& acc,
                                      FragmentC const& gate, FragmentCompute const& bias) const {
    const FragmentCompute g = to_compute(gate);
    FragmentCompute tv, zv;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      tv[i] = acc[i] + bias[i];
      zv[i] = tv[i] * g[i];
    }
    z = to_element(zv);
    t = to_element(tv);
  }

  // kBackward: z = acc * gate, t = scale * acc * pre (bias is null here: zeros).
  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT& t, FragmentAccumulator const& acc,
                                      FragmentC const& gate, FragmentC const& pre,
                                      FragmentCompute const& bias) const {
    const FragmentCompute g = to_compute(gate), q = to_compute(pre);
    FragmentCompute tv, zv;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      const float a = acc[i] + bias[i];
      zv[i] = a * g[i];
      tv[i] = scale_ * a * q[i];
    }
    z = to_element(zv);
    t = to_element(tv);
  }

  // Required by the concept; unreachable while is_source_needed() is true. Written as the
  // ungated value so that it would still be a meaningful result.
  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT& t, FragmentAccumulator const& acc,
                                      FragmentCompute const& bias) const {
    FragmentCompute tv;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) tv[i] = acc[i] + bias[i];
    z = to_element(tv);
    t = z;
  }

 private:
  CUTLASS_HOST_DEVICE static FragmentCompute to_compute(FragmentC const& v) {
    return cutlass::NumericArrayConverter<float, Element, kCount>()(v);
  }
  CUTLASS_HOST_DEVICE static FragmentZ to_element(FragmentCompute const& v) {
    return cutlass::NumericArrayConverter<Element, float, kCount, cutlass::FloatRoundStyle::round_to_nearest>()(v);
  }

  float scale_;
};

// kForward reads W as B = W^T, i.e. column-major [K, N]; kBackward reads W row-major [K, N].
template <typename Element, GateMode kMode>
using GatedGemm = cutlass::gemm::device::GemmUniversalWithBroadcast<
    Element, cutlass::layout::RowMajor,
    Element,
    typename std::conditional<kMode == GateMode::kForward, cutlass::layout::ColumnMajor,
                              cutlass::layout::RowMajor>::type,
    Element, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp,
    cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 64, 32>, cutlass::gemm::GemmShape<64, 32, 32>,
    cutlass::gemm::GemmShape<16, 8, 16>, GateOp<Element, kMode == GateMode::kBackward>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, 4, kAlign, kAlign>;

template <typename Gemm>
cudaError_t launch(typename Gemm::Arguments const& args, cudaStream_t stream) {
  Gemm op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // kGemm mode with one K slice needs no workspace (no split-K semaphores).
  if (Gemm::get_workspace_size(args) != 0) return cudaErrorInvalidValue;
  if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (op.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

// The broadcast-epilogue GEMM's arguments: one batch, no batch strides, the bias vector (ldr 0:
// the same row for every tile row). The single-source form (kForward) takes the gate as its C;
// the two-source form (kBackward) takes the gate and `pre` as C1 and C2.
template <typename Element, GateMode kMode>
typename GatedGemm<Element, kMode>::Arguments arguments(const GatedGemmParams& p) {
  using Gemm = GatedGemm<Element, kMode>;
  const cutlass::gemm::GemmCoord size(static_cast<int>(p.M), static_cast<int>(p.N), static_cast<int>(p.K));
  const typename Gemm::EpilogueOutputOp::Params epilogue(p.scale);
  const auto mode = cutlass::gemm::GemmUniversalMode::kGemm;
  void* bias = const_cast<void*>(p.bias);
  const int64_t ld_t = p.t != nullptr ? p.ld_t : p.ld_z;
  if constexpr (kMode == GateMode::kForward) {
    return {mode, size, 1, epilogue, p.a, p.w, p.gate, p.z, bias, p.t,
            0, 0, 0, 0, 0, 0, p.lda, p.ldw, p.ld_gate, p.ld_z, 0, ld_t};
  } else {
    return {mode, size, 1, epilogue, p.a, p.w, p.gate, p.pre, p.z, bias, p.t,
            0, 0, 0, 0, 0, 0, 0, p.lda, p.ldw, p.ld_gate, p.ld_pre, p.ld_z, 0, ld_t};
  }
}

template <typename Element, GateMode kMode>
cudaError_t run(const GatedGemmParams& p, cudaStream_t stream) {
  return launch<GatedGemm<Element, kMode>>(arguments<Element, kMode>(p), stream);
}

bool aligned(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool aligned(int64_t ld) { return ld % kAlign == 0; }

}  // namespace

bool gnconv_gated_gemm_supported(const GatedGemmParams& p) {
  if (!cu::tensor_core_dtype_on_device(p.dtype)) return false;
  constexpr int64_t kIntMax = 2147483647;
  if (p.M <= 0 || p.N <= 0 || p.K <= 0 || p.M > kIntMax) return false;
  const bool backward = p.mode == GateMode::kBackward;
  if (backward && (p.pre == nullptr || p.bias != nullptr)) return false;
  return aligned(p.N) && aligned(p.K) && aligned(p.lda) && aligned(p.ldw) && aligned(p.ld_gate) &&
         aligned(p.ld_z) && (p.t == nullptr || aligned(p.ld_t)) && (!backward || aligned(p.ld_pre)) &&
         aligned(p.a) && aligned(p.w) && aligned(p.bias) && aligned(p.gate) && aligned(p.pre) &&
         aligned(p.z) && aligned(p.t);
}

cudaError_t gnconv_gated_gemm_cuda(const GatedGemmParams& p, cudaStream_t stream) {
  if (!gnconv_gated_gemm_supported(p)) return cudaErrorInvalidValue;
  const bool half = p.dtype == DType::Float16;
  if (p.mode == GateMode::kForward) {
    return half ? run<cutlass::half_t, GateMode::kForward>(p, stream)
                : run<cutlass::bfloat16_t, GateMode::kForward>(p, stream);
  }
  return half ? run<cutlass::half_t, GateMode::kBackward>(p, stream)
              : run<cutlass::bfloat16_t, GateMode::kBackward>(p, stream);
}

#else  // built without CUTLASS: the launcher always takes the GEMM + elementwise path

bool gnconv_gated_gemm_supported(const GatedGemmParams&) { return false; }
cudaError_t gnconv_gated_gemm_cuda(const GatedGemmParams&, cudaStream_t) { return cudaErrorNotSupported; }

#endif

}  // namespace gnconv
}  // namespace tokenmix
