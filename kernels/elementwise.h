// Helpers shared by the elementwise layer kernels (rms_norm.cpp, swiglu.cpp, rope.cpp).
//
// The kernels are plain loops that GCC / Clang vectorise. FASTRM_CLONES compiles a function
// once per x86-64 level (AVX-512, AVX2, baseline) and picks the clone at load time
// (function multi-versioning), so one build runs on every x86-64 CPU at that CPU's width.
// bf16 is handled as raw uint16 bits (conversion by shifts, round-to-nearest-even like c10),
// so the conversion vectorises too; math is always fp32 for fp32 / bf16 and fp64 for fp64.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTRM_NO_CLONES)
#define FASTRM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTRM_CLONES
#endif

#define FASTRM_INLINE inline __attribute__((always_inline))

namespace fastrm {
namespace elementwise {

FASTRM_INLINE float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, NaN kept quiet (c10::BFloat16's rule).
FASTRM_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// Storage type <-> compute type. T is float, double or uint16_t (bf16 bits).
template <typename T> struct Io;
template <> struct Io<float> {
  using acc = float;
  static FASTRM_INLINE float load(float v) { return v; }
  static FASTRM_INLINE float store(float v) { return v; }
};
template <> struct Io<double> {
  using acc = double;
  static FASTRM_INLINE double load(double v) { return v; }
  static FASTRM_INLINE double store(double v) { return v; }
};
template <> struct Io<uint16_t> {
  using acc = float;
  static FASTRM_INLINE float load(uint16_t v) { return bf16_bits_to_float(v); }
  static FASTRM_INLINE uint16_t store(float v) { return float_to_bf16_bits(v); }
};

// exp(x) for fp32 in a form compilers vectorise (Cephes expf: range reduction by ln 2, degree-6
// polynomial, 2^n by exponent bits); within 2 ulp of std::exp on [-87, 88], saturating outside.
// n = round(x / ln 2) by adding and subtracting 1.5 * 2^23 (no floor: with trapping math on,
// compilers will not vectorise floor).
FASTRM_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  const uint32_t scale_bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}
FASTRM_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename A> FASTRM_INLINE A sigmoid(A x) { return A(1) / (A(1) + exp_approx(-x)); }

// Raw pointer of a CPU tensor's storage as T (bf16 tensors as uint16_t bits).
template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// Dispatches on fp32 / fp64 / bf16 with `T` = float / double / uint16_t inside `body`.
#define FASTRM_DISPATCH_FLOAT_BF16(dtype, name, ...)                                   \
  [&] {                                                                                \
    switch (dtype) {                                                                   \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }                      \
      case at::kDouble: { using T = double; return __VA_ARGS__(); }                    \
      case at::kBFloat16: { using T = uint16_t; return __VA_ARGS__(); }                \
      default: TORCH_CHECK(false, name, ": dtype ", dtype,                             \
                           " is not supported (float32, float64, bfloat16)");          \
    }                                                                                  \
  }()

}  // namespace elementwise
}  // namespace fastrm
