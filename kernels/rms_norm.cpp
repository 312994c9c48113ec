// RMSNorm for CPU, forward and backward in one pass over each row (fastrm.ops.rms_norm).
//
//   forward:  rstd[r] = 1 / sqrt(mean_i x[r, i]^2 + eps),  y[r, i] = x[r, i] * rstd[r] * w[i]
//   backward: xhat = x * rstd, g = dy * w,
//             dx[r, i] = rstd[r] * (g[r, i] - xhat[r, i] * mean_i(g[r, i] * xhat[r, i]))
//             dw[i]    = sum_r dy[r, i] * xhat[r, i]
//
// Math in fp32 (fp64 for fp64 input), the output in x's dtype: torchtune's RMSNorm
// (`F.rms_norm(x.float(), ..., weight).to(x.dtype)`) with one rounding instead of two passes
// through an fp32 copy of x. What the backward needs is x and rstd [R] only.
// dw is reduced over fixed blocks of rows, then over blocks in order, so the result does not
// depend on the number of threads.
//
// Ops (torch.ops.fastrm.*):
//   rms_norm_forward(x [R, D], weight [D], eps) -> (y [R, D] x.dtype, rstd [R] f32 | f64)
//   rms_norm_backward(grad_y [R, D], x [R, D], weight [D], rstd [R])
//       -> (grad_x [R, D] x.dtype, grad_weight [D] f32 | f64)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "elementwise.h"

namespace fastrm {
namespace {

using at::Tensor;
using namespace elementwise;

constexpr int64_t kRowBlock = 16;  // rows per dw partial sum (fixed: thread-count independent)

template <typename T, typename A>
FASTRM_INLINE void fwd_rows(const T* x, const A* w, T* y, A* rstd, int64_t lo, int64_t hi,
                            int64_t d, A eps) {
  for (int64_t r = lo; r < hi; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    A part[16] = {};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16)
      for (int k = 0; k < 16; ++k) {
        const A v = Io<T>::load(xr[i + k]);
        part[k] += v * v;
      }
    A ss = 0;
    for (; i < d; ++i) {
      const A v = Io<T>::load(xr[i]);
      ss += v * v;
    }
    for (int k = 0; k < 16; ++k) ss += part[k];
    const A s = A(1) / std::sqrt(ss / A(d) + eps);
    rstd[r] = s;
    for (int64_t j = 0; j < d; ++j) yr[j] = Io<T>::store(Io<T>::load(xr[j]) * s * w[j]);
  }
}

// Rows [lo, hi) of one block: dx, and this block's dw partial sums in dw_part [D].
template <typename T, typename A>
FASTRM_INLINE void bwd_rows(const T* dy, const T* x, const A* w, const A* rstd, T* dx,
                            A* dw_part, int64_t lo, int64_t hi, int64_t d) {
  for (int64_t j = 0; j < d; ++j) dw_part[j] = 0;
  for (int64_t r = lo; r < hi; ++r) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    T* dxr = dx + r * d;
    const A s = rstd[r];
    A part[16] = {};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16)
      for (int k = 0; k < 16; ++k)
        part[k] += Io<T>::load(gr[i + k]) * w[i + k] * Io<T>::load(xr[i + k]);
    A dot = 0;
    for (; i < d; ++i) dot += Io<T>::load(gr[i]) * w[i] * Io<T>::load(xr[i]);
    for (int k = 0; k < 16; ++k) dot += part[k];
    // xhat * mean(g * xhat) = x * (sum_i g x) * rstd^2 / D
    const A c = dot * s * s / A(d);
    for (int64_t j = 0; j < d; ++j) {
      const A xv = Io<T>::load(xr[j]);
      const A gv = Io<T>::load(gr[j]);
      dxr[j] = Io<T>::store(s * (gv * w[j] - xv * c));
      dw_part[j] += gv * xv * s;
    }
  }
}

// One cloned entry point per storage type (the templates above inline into each clone).
FASTRM_CLONES void fwd_f32(const float* x, const float* w, float* y, float* rstd, int64_t lo,
                           int64_t hi, int64_t d, float eps) {
  fwd_rows<float, float>(x, w, y, rstd, lo, hi, d, eps);
}
FASTRM_CLONES void fwd_bf16(const uint16_t* x, const float* w, uint16_t* y, float* rstd,
                            int64_t lo, int64_t hi, int64_t d, float eps) {
  fwd_rows<uint16_t, float>(x, w, y, rstd, lo, hi, d, eps);
}
void fwd_f64(const double* x, const double* w, double* y, double* rstd, int64_t lo, int64_t hi,
             int64_t d, double eps) {
  fwd_rows<double, double>(x, w, y, rstd, lo, hi, d, eps);
}
FASTRM_CLONES void bwd_f32(const float* dy, const float* x, const float* w, const float* rstd,
                           float* dx, float* dw, int64_t lo, int64_t hi, int64_t d) {
  bwd_rows<float, float>(dy, x, w, rstd, dx, dw, lo, hi, d);
}
FASTRM_CLONES void bwd_bf16(const uint16_t* dy, const uint16_t* x, const float* w,
                            const float* rstd, uint16_t* dx, float* dw, int64_t lo, int64_t hi,
                            int64_t d) {
  bwd_rows<uint16_t, float>(dy, x, w, rstd, dx, dw, lo, hi, d);
}
void bwd_f64(const double* dy, const double* x, const double* w, const double* rstd, double* dx,
             double* dw, int64_t lo, int64_t hi, int64_t d) {
  bwd_rows<double, double>(dy, x, w, rstd, dx, dw, lo, hi, d);
}

FASTRM_INLINE void fwd(const float* x, const float* w, float* y, float* s, int64_t lo, int64_t hi,
                       int64_t d, double eps) {
  fwd_f32(x, w, y, s, lo, hi, d, static_cast<float>(eps));
}
FASTRM_INLINE void fwd(const uint16_t* x, const float* w, uint16_t* y, float* s, int64_t lo,
                       int64_t hi, int64_t d, double eps) {
  fwd_bf16(x, w, y, s, lo, hi, d, static_cast<float>(eps));
}
FASTRM_INLINE void fwd(const double* x, const double* w, double* y, double* s, int64_t lo,
                       int64_t hi, int64_t d, double eps) {
  fwd_f64(x, w, y, s, lo, hi, d, eps);
}
FASTRM_INLINE void bwd(const float* dy, const float* x, const float* w, const float* s, float* dx,
                       float* dw, int64_t lo, int64_t hi, int64_t d) {
  bwd_f32(dy, x, w, s, dx, dw, lo, hi, d);
}
FASTRM_INLINE void bwd(const uint16_t* dy, const uint16_t* x, const float* w, const float* s,
                       uint16_t* dx, float* dw, int64_t lo, int64_t hi, int64_t d) {
  bwd_bf16(dy, x, w, s, dx, dw, lo, hi, d);
}
FASTRM_INLINE void bwd(const double* dy, const double* x, const double* w, const double* s,
                       double* dx, double* dw, int64_t lo, int64_t hi, int64_t d) {
  bwd_f64(dy, x, w, s, dx, dw, lo, hi, d);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_rows(const Tensor& t, const char* name, int64_t rows, int64_t d) {
  TORCH_CHECK(t.device().is_cpu(), "rms_norm: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == d, "rms_norm: ", name,
              " must be [", rows, ", ", d, "], got ", t.sizes());
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x_in, const Tensor& weight, double eps) {
  TORCH_CHECK(x_in.dim() == 2, "rms_norm: x must be [R, D] (flatten the leading dims)");
  const int64_t rows = x_in.size(0), d = x_in.size(1);
  check_rows(x_in, "x", rows, d);
  TORCH_CHECK(weight.numel() == d, "rms_norm: weight must have D = ", d, " elements");
  const Tensor x = x_in.contiguous();
  const at::ScalarType at_acc = acc_type(x.scalar_type());
  const Tensor w = weight.reshape({d}).to(at_acc).contiguous();
  Tensor y = at::empty_like(x);
  Tensor rstd = at::empty({rows}, x.options().dtype(at_acc));
  FASTRM_DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm_forward", [&] {
    using A = typename Io<T>::acc;
    const T* xp = ptr<const T>(x);
    const A* wp = ptr<const A>(w);
    T* yp = ptr<T>(y);
    A* sp = ptr<A>(rstd);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) { fwd(xp, wp, yp, sp, lo, hi, d, eps); });
  });
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& grad_y, const Tensor& x_in,
                                              const Tensor& weight, const Tensor& rstd_in) {
  TORCH_CHECK(x_in.dim() == 2, "rms_norm: x must be [R, D]");
  const int64_t rows = x_in.size(0), d = x_in.size(1);
  check_rows(grad_y, "grad_y", rows, d);
  const Tensor x = x_in.contiguous();
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "rms_norm: grad_y dtype ",
              grad_y.scalar_type(), " differs from x dtype ", x.scalar_type());
  const Tensor dy = grad_y.contiguous();
  const at::ScalarType at_acc = acc_type(x.scalar_type());
  TORCH_CHECK(rstd_in.numel() == rows && rstd_in.scalar_type() == at_acc,
              "rms_norm: rstd must be [", rows, "] of ", at_acc);
  const Tensor rstd = rstd_in.contiguous();
  const Tensor w = weight.reshape({d}).to(at_acc).contiguous();
  Tensor dx = at::empty_like(x);
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  Tensor part = at::empty({std::max<int64_t>(blocks, 1), d}, x.options().dtype(at_acc));
  Tensor dw = at::zeros({d}, x.options().dtype(at_acc));
  FASTRM_DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm_backward", [&] {
    using A = typename Io<T>::acc;
    const T* dyp = ptr<const T>(dy);
    const T* xp = ptr<const T>(x);
    const A* wp = ptr<const A>(w);
    const A* sp = ptr<const A>(rstd);
    T* dxp = ptr<T>(dx);
    A* pp = ptr<A>(part);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        bwd(dyp, xp, wp, sp, dxp, pp + b * d, b * kRowBlock, std::min(rows, (b + 1) * kRowBlock), d);
    });
    A* dwp = ptr<A>(dw);
    // blocks summed in order for each column (columns in parallel)
    at::parallel_for(0, d, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t j = j0; j < j1; ++j) dwp[j] += pp[b * d + j];
    });
  });
  return {dx, dw};
}

}  // namespace
}  // namespace fastrm

TORCH_LIBRARY_FRAGMENT(fastrm, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrm, CPU, m) {
  m.impl("rms_norm_forward", &fastrm::rms_norm_forward);
  m.impl("rms_norm_backward", &fastrm::rms_norm_backward);
}
