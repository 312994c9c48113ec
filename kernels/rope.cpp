// Rotary position embedding for CPU, torchtune's interleaved layout (fastrm.ops.rope).
//
// Channel pairs (2i, 2i + 1) of every head are rotated by the angle of the token's position:
//   y[t, h, 2i]     = x[t, h, 2i] * cos[t, i] - sign * x[t, h, 2i + 1] * sin[t, i]
//   y[t, h, 2i + 1] = x[t, h, 2i + 1] * cos[t, i] + sign * x[t, h, 2i] * sin[t, i]
// sign = +1 is the forward (torchtune's RotaryPositionalEmbeddings / Llama3ScaledRoPE), sign = -1
// the backward (the transpose of a rotation is the inverse rotation). `cos_sin [T, D/2, 2]` is
// the RoPE cache gathered at each token's position (fp32, fp64 for fp64 input): the backward
// needs nothing else, so no activation is saved.
//
// Op (torch.ops.fastrm.*):
//   rope_rotate(x [T, H, D], cos_sin [T, D/2, 2], inverse) -> y [T, H, D] (x's dtype)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "elementwise.h"

namespace fastrm {
namespace {

using at::Tensor;
using namespace elementwise;

template <typename T, typename A>
FASTRM_INLINE void rotate_rows(const T* x, const A* cs, T* y, int64_t lo, int64_t hi, int64_t h,
                               int64_t d, A sign) {
  const int64_t half = d / 2;
  for (int64_t t = lo; t < hi; ++t) {
    const A* c = cs + t * d;  // [D/2, 2] = (cos, sin) pairs
    for (int64_t k = 0; k < h; ++k) {
      const T* xr = x + (t * h + k) * d;
      T* yr = y + (t * h + k) * d;
      for (int64_t i = 0; i < half; ++i) {
        const A x0 = Io<T>::load(xr[2 * i]), x1 = Io<T>::load(xr[2 * i + 1]);
        const A co = c[2 * i], si = sign * c[2 * i + 1];
        yr[2 * i] = Io<T>::store(x0 * co - x1 * si);
        yr[2 * i + 1] = Io<T>::store(x1 * co + x0 * si);
      }
    }
  }
}

FASTRM_CLONES void rotate_f32(const float* x, const float* cs, float* y, int64_t lo, int64_t hi,
                              int64_t h, int64_t d, float sign) {
  rotate_rows(x, cs, y, lo, hi, h, d, sign);
}
FASTRM_CLONES void rotate_bf16(const uint16_t* x, const float* cs, uint16_t* y, int64_t lo,
                               int64_t hi, int64_t h, int64_t d, float sign) {
  rotate_rows(x, cs, y, lo, hi, h, d, sign);
}
FASTRM_INLINE void rotate(const float* x, const float* cs, float* y, int64_t lo, int64_t hi,
                          int64_t h, int64_t d, float sign) {
  rotate_f32(x, cs, y, lo, hi, h, d, sign);
}
FASTRM_INLINE void rotate(const uint16_t* x, const float* cs, uint16_t* y, int64_t lo, int64_t hi,
                          int64_t h, int64_t d, float sign) {
  rotate_bf16(x, cs, y, lo, hi, h, d, sign);
}
FASTRM_INLINE void rotate(const double* x, const double* cs, double* y, int64_t lo, int64_t hi,
                          int64_t h, int64_t d, double sign) {
  rotate_rows(x, cs, y, lo, hi, h, d, sign);
}

Tensor rope_rotate(const Tensor& x_in, const Tensor& cos_sin_in, bool inverse) {
  TORCH_CHECK(x_in.device().is_cpu() && cos_sin_in.device().is_cpu(), "rope: CPU tensors expected");
  TORCH_CHECK(x_in.dim() == 3, "rope: x must be [T, H, D], got ", x_in.sizes());
  const int64_t t = x_in.size(0), h = x_in.size(1), d = x_in.size(2);
  TORCH_CHECK(d % 2 == 0, "rope: head dim D = ", d, " must be even");
  const at::ScalarType acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cos_sin_in.dim() == 3 && cos_sin_in.size(0) == t && cos_sin_in.size(1) == d / 2 &&
                  cos_sin_in.size(2) == 2,
              "rope: cos_sin must be [", t, ", ", d / 2, ", 2], got ", cos_sin_in.sizes());
  TORCH_CHECK(cos_sin_in.scalar_type() == acc, "rope: cos_sin must be ", acc, " for x of ",
              x_in.scalar_type());
  const Tensor x = x_in.contiguous(), cs = cos_sin_in.contiguous();
  Tensor y = at::empty_like(x);
  FASTRM_DISPATCH_FLOAT_BF16(x.scalar_type(), "rope_rotate", [&] {
    using A = typename Io<T>::acc;
    const T* xp = ptr<const T>(x);
    const A* cp = ptr<const A>(cs);
    T* yp = ptr<T>(y);
    const A sign = inverse ? A(-1) : A(1);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h * d, 1));
    at::parallel_for(0, t, grain, [&](int64_t lo, int64_t hi) { rotate(xp, cp, yp, lo, hi, h, d, sign); });
  });
  return y;
}

}  // namespace
}  // namespace fastrm

TORCH_LIBRARY_FRAGMENT(fastrm, m) {
  m.def("rope_rotate(Tensor x, Tensor cos_sin, bool inverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastrm, CPU, m) { m.impl("rope_rotate", &fastrm::rope_rotate); }
