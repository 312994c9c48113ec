// SwiGLU's elementwise part for CPU, forward and backward in one pass (fastrm.ops.swiglu).
//
//   forward:  a = silu(g) * u = g * sigmoid(g) * u
//   backward: s = sigmoid(g),  dg = da * u * s * (1 + g * (1 - s)),  du = da * g * s
//
// g, u are the gate (w1) and up (w3) projections of torchtune's FeedForward. Math in fp32
// (fp64 for fp64 input), one rounding to the storage dtype. The backward recomputes sigmoid(g)
// from g, so the MLP saves g and u only (not silu(g) or a).
//
// Ops (torch.ops.fastrm.*):
//   silu_mul_forward(gate [..], up [..]) -> a [..]                     (same shape and dtype)
//   silu_mul_backward(grad_a [..], gate [..], up [..]) -> (grad_gate [..], grad_up [..])
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "elementwise.h"

namespace fastrm {
namespace {

using at::Tensor;
using namespace elementwise;

template <typename T>
FASTRM_INLINE void fwd_range(const T* g, const T* u, T* a, int64_t lo, int64_t hi) {
  using A = typename Io<T>::acc;
  for (int64_t i = lo; i < hi; ++i) {
    const A gv = Io<T>::load(g[i]);
    a[i] = Io<T>::store(gv * sigmoid(gv) * Io<T>::load(u[i]));
  }
}

template <typename T>
FASTRM_INLINE void bwd_range(const T* da, const T* g, const T* u, T* dg, T* du, int64_t lo,
                             int64_t hi) {
  using A = typename Io<T>::acc;
  for (int64_t i = lo; i < hi; ++i) {
    const A gv = Io<T>::load(g[i]);
    const A s = sigmoid(gv);
    const A d = Io<T>::load(da[i]);
    dg[i] = Io<T>::store(d * Io<T>::load(u[i]) * s * (A(1) + gv * (A(1) - s)));
    du[i] = Io<T>::store(d * gv * s);
  }
}

FASTRM_CLONES void fwd_f32(const float* g, const float* u, float* a, int64_t lo, int64_t hi) {
  fwd_range(g, u, a, lo, hi);
}
FASTRM_CLONES void fwd_bf16(const uint16_t* g, const uint16_t* u, uint16_t* a, int64_t lo,
                            int64_t hi) {
  fwd_range(g, u, a, lo, hi);
}
FASTRM_CLONES void bwd_f32(const float* da, const float* g, const float* u, float* dg, float* du,
                           int64_t lo, int64_t hi) {
  bwd_range(da, g, u, dg, du, lo, hi);
}
FASTRM_CLONES void bwd_bf16(const uint16_t* da, const uint16_t* g, const uint16_t* u,
                            uint16_t* dg, uint16_t* du, int64_t lo, int64_t hi) {
  bwd_range(da, g, u, dg, du, lo, hi);
}

FASTRM_INLINE void fwd(const float* g, const float* u, float* a, int64_t lo, int64_t hi) {
  fwd_f32(g, u, a, lo, hi);
}
FASTRM_INLINE void fwd(const uint16_t* g, const uint16_t* u, uint16_t* a, int64_t lo, int64_t hi) {
  fwd_bf16(g, u, a, lo, hi);
}
FASTRM_INLINE void fwd(const double* g, const double* u, double* a, int64_t lo, int64_t hi) {
  fwd_range(g, u, a, lo, hi);
}
FASTRM_INLINE void bwd(const float* da, const float* g, const float* u, float* dg, float* du,
                       int64_t lo, int64_t hi) {
  bwd_f32(da, g, u, dg, du, lo, hi);
}
FASTRM_INLINE void bwd(const uint16_t* da, const uint16_t* g, const uint16_t* u, uint16_t* dg,
                       uint16_t* du, int64_t lo, int64_t hi) {
  bwd_bf16(da, g, u, dg, du, lo, hi);
}
FASTRM_INLINE void bwd(const double* da, const double* g, const double* u, double* dg,
                       double* du, int64_t lo, int64_t hi) {
  bwd_range(da, g, u, dg, du, lo, hi);
}

void check_same(const Tensor& a, const Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "silu_mul: CPU tensors expected");
  TORCH_CHECK(a.sizes() == b.sizes(), "silu_mul: ", na, " ", a.sizes(), " and ", nb, " ",
              b.sizes(), " must have the same shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "silu_mul: ", na, " ", a.scalar_type(),
              " and ", nb, " ", b.scalar_type(), " must have the same dtype");
}

constexpr int64_t kGrain = 1 << 14;

Tensor silu_mul_forward(const Tensor& gate_in, const Tensor& up_in) {
  check_same(gate_in, up_in, "gate", "up");
  const Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  Tensor a = at::empty_like(g);
  FASTRM_DISPATCH_FLOAT_BF16(g.scalar_type(), "silu_mul_forward", [&] {
    const T* gp = ptr<const T>(g);
    const T* up = ptr<const T>(u);
    T* ap = ptr<T>(a);
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t lo, int64_t hi) { fwd(gp, up, ap, lo, hi); });
  });
  return a;
}

std::tuple<Tensor, Tensor> silu_mul_backward(const Tensor& grad_a, const Tensor& gate_in,
                                              const Tensor& up_in) {
  check_same(gate_in, up_in, "gate", "up");
  check_same(grad_a, gate_in, "grad_a", "gate");
  const Tensor da = grad_a.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  Tensor dg = at::empty_like(g), du = at::empty_like(u);
  FASTRM_DISPATCH_FLOAT_BF16(g.scalar_type(), "silu_mul_backward", [&] {
    const T* dap = ptr<const T>(da);
    const T* gp = ptr<const T>(g);
    const T* up = ptr<const T>(u);
    T* dgp = ptr<T>(dg);
    T* dup = ptr<T>(du);
    at::parallel_for(0, g.numel(), kGrain,
                     [&](int64_t lo, int64_t hi) { bwd(dap, gp, up, dgp, dup, lo, hi); });
  });
  return {dg, du};
}

}  // namespace
}  // namespace fastrm

TORCH_LIBRARY_FRAGMENT(fastrm, m) {
  m.def("silu_mul_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward(Tensor grad_a, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrm, CPU, m) {
  m.impl("silu_mul_forward", &fastrm::silu_mul_forward);
  m.impl("silu_mul_backward", &fastrm::silu_mul_backward);
}
