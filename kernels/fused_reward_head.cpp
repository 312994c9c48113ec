// Fused reward head + pairwise loss for CPU: the native backend of fastrm.ops.
//
//   rewards[n] = hidden[pos[n]] . weight + bias                         (n < N, fp32 accumulation)
//   loss, dL/dr[N] in closed form (pair or cross-prompt contrast mode; fastrm/ops/head_loss_contract.py)
//   backward: grad_hidden[pos[n]] += g * dL/dr[n] * weight, grad_weight = g * sum_n dL/dr[n] *
//             hidden[pos[n]], grad_bias = g * sum_n dL/dr[n]
//
// The [T, 1] head output over all tokens is never formed: the forward reads N rows of hidden.
// Ops (torch.ops.fastrm.*):
//   fused_reward_head_forward(...) -> (rewards [N] f32, loss [] f32, dloss_drewards [N] f32)
//   fused_reward_head_backward(hidden, weight, reward_positions, dloss_drewards, grad_output,
//                              need_hidden_grad) -> (grad_hidden [T, D] (hidden dtype) or [0],
//                                                    grad_weight [D] f32, grad_bias [] f32)
// Parallelism: at::parallel_for (OpenMP in torch's CPU builds) over reward rows in the forward,
// over unique rows and over D in the backward. Every reduction has a fixed order, so results
// do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace fastrm {
namespace {

using at::Tensor;

enum class Objective { kBradleyTerry, kHinge };

struct LossOptions {
  Objective objective;
  double label_smoothing;
  double hinge_margin;
  double centering;
};

Objective parse_objective(c10::string_view name) {
  if (name == "bradley_terry") return Objective::kBradleyTerry;
  if (name == "hinge") return Objective::kHinge;
  TORCH_CHECK(false, "fused_reward_head: unknown objective '", std::string(name),
              "' (choose bradley_terry or hinge)");
  return Objective::kBradleyTerry;  // unreachable
}

// softplus(x) = log(1 + exp(x)) without overflow.
inline double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

// sigmoid(x) without overflow.
inline double sigmoid(double x) {
  const double z = std::exp(-std::abs(x));
  return x >= 0 ? 1.0 / (1.0 + z) : z / (1.0 + z);
}

// l(delta) and dl/ddelta of the per-comparison objective.
inline void objective_value_grad(double delta, const LossOptions& o, double* value, double* grad) {
  if (o.objective == Objective::kBradleyTerry) {
    const double eps = o.label_smoothing;
    const double s = sigmoid(-delta);
    *value = (1.0 - eps) * softplus(-delta) + (eps != 0.0 ? eps * softplus(delta) : 0.0);
    *grad = -(1.0 - eps) * s + eps * (1.0 - s);
  } else {
    *value = std::max(o.hinge_margin - delta, 0.0);
    *grad = delta < o.hinge_margin ? -1.0 : 0.0;
  }
}

// Adds the centering term c * (r_c + r_r)^2 to value and returns the two reward gradients.
inline void comparison_terms(double rc, double rr, double m, const LossOptions& o, double* value,
                             double* g_chosen, double* g_rejected) {
  double grad;
  objective_value_grad(rc - rr - m, o, value, &grad);
  const double s = rc + rr;
  *value += o.centering * s * s;
  *g_chosen = grad + 2.0 * o.centering * s;
  *g_rejected = -grad + 2.0 * o.centering * s;
}

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// fp32 dot product of one hidden row (any float type) with the fp32 weight; eight partial sums
// let the compiler vectorize without -ffast-math.
template <typename T>
float row_dot(const T* h, const float* w, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += to_f(h[i + k]) * w[i + k];
  }
  float tail = 0.f;
  for (; i < d; ++i) tail += to_f(h[i]) * w[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

void check_index(const Tensor& idx, int64_t upper, const char* name) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, name, " must be a 1-D int64 tensor");
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < upper, name, "[", i, "] = ", p[i], " is out of range [0, ",
                upper, ")");
  }
}

Tensor f32_vector(const c10::optional<Tensor>& t, int64_t len, const char* name) {
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, name, " must have shape [", len, "]");
  return t->to(at::kFloat).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> fused_reward_head_forward(
    const Tensor& hidden_in, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& reward_positions, const Tensor& chosen_index, const Tensor& rejected_index,
    const c10::optional<Tensor>& margin, const c10::optional<Tensor>& comparison_weight,
    const c10::optional<Tensor>& contrast_weights, c10::string_view objective,
    double label_smoothing, double hinge_margin, double centering_coefficient) {
  TORCH_CHECK(hidden_in.dim() == 2, "hidden must be [T, D]");
  TORCH_CHECK(hidden_in.device().is_cpu(), "fused_reward_head_forward is a CPU op");
  const Tensor hidden = hidden_in.stride(1) == 1 ? hidden_in : hidden_in.contiguous();
  const int64_t t = hidden.size(0), d = hidden.size(1), row_stride = hidden.stride(0);
  TORCH_CHECK(weight.numel() == d, "weight must have D = ", d, " elements");
  const Tensor w32 = weight.reshape({d}).to(at::kFloat).contiguous();
  const double b = bias.has_value() ? bias->to(at::kDouble).item<double>() : 0.0;
  const Tensor pos = reward_positions.contiguous();
  check_index(pos, t, "reward_positions");
  const int64_t n = pos.numel();
  const Tensor ci = chosen_index.contiguous(), ri = rejected_index.contiguous();
  check_index(ci, n, "chosen_index");
  check_index(ri, n, "rejected_index");
  const LossOptions opt{parse_objective(objective), label_smoothing, hinge_margin,
                        centering_coefficient};

  // 1) rewards: one fp32 dot product per scored row.
  Tensor rewards = at::empty({n}, hidden.options().dtype(at::kFloat));
  float* r = rewards.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* wp = w32.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_rh_fwd", [&] {
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) r[k] = row_dot(h + pp[k] * row_stride, wp, d) + static_cast<float>(b);
    });
  });

  // 2) loss and dL/dr; comparisons are few (P or Bc x Br), scalar math in double.
  std::vector<double> dldr(n, 0.0);
  double loss = 0.0;
  const int64_t* c = ci.data_ptr<int64_t>();
  const int64_t* j = ri.data_ptr<int64_t>();
  if (contrast_weights.has_value()) {
    const int64_t bc = ci.numel(), br = ri.numel();
    TORCH_CHECK(contrast_weights->dim() == 2 && contrast_weights->size(0) == bc &&
                    contrast_weights->size(1) == br,
                "contrast_weights must be [", bc, ", ", br, "]");
    TORCH_CHECK(!comparison_weight.has_value(), "comparison_weight does not apply in contrast mode");
    const Tensor wc = contrast_weights->to(at::kFloat).contiguous();
    const float* W = wc.data_ptr<float>();
    Tensor m32;
    const float* m = nullptr;
    if (margin.has_value()) {
      TORCH_CHECK(bc == br, "margin needs Bc == Br in contrast mode");
      m32 = f32_vector(margin, bc, "margin");
      m = m32.data_ptr<float>();
    }
    std::vector<double> row_grad(bc, 0.0), row_loss(bc, 0.0), col_grad(br, 0.0);
    // Row pass (parallel over chosen i): loss and dL/dr_c[i]; column pass (parallel over
    // rejected j): dL/dr_r[j]. Each sum runs in index order, so no thread-count dependence.
    at::parallel_for(0, bc, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        double acc_l = 0.0, acc_g = 0.0;
        for (int64_t k = 0; k < br; ++k) {
          double v, gc, gr;
          comparison_terms(r[c[i]], r[j[k]], (m && i == k) ? m[i] : 0.0, opt, &v, &gc, &gr);
          acc_l += W[i * br + k] * v;
          acc_g += W[i * br + k] * gc;
        }
        row_loss[i] = acc_l;
        row_grad[i] = acc_g;
      }
    });
    at::parallel_for(0, br, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        double acc_g = 0.0;
        for (int64_t i = 0; i < bc; ++i) {
          double v, gc, gr;
          comparison_terms(r[c[i]], r[j[k]], (m && i == k) ? m[i] : 0.0, opt, &v, &gc, &gr);
          acc_g += W[i * br + k] * gr;
        }
        col_grad[k] = acc_g;
      }
    });
    for (int64_t i = 0; i < bc; ++i) {
      loss += row_loss[i] / bc;
      dldr[c[i]] += row_grad[i] / bc;
    }
    for (int64_t k = 0; k < br; ++k) dldr[j[k]] += col_grad[k] / bc;
  } else {
    const int64_t p = ci.numel();
    TORCH_CHECK(ri.numel() == p, "chosen_index and rejected_index must have the same length");
    Tensor m32, w32c;
    const float* m = nullptr;
    const float* cw = nullptr;
    if (margin.has_value()) {
      m32 = f32_vector(margin, p, "margin");
      m = m32.data_ptr<float>();
    }
    double norm = static_cast<double>(p);
    if (comparison_weight.has_value()) {
      w32c = f32_vector(comparison_weight, p, "comparison_weight");
      cw = w32c.data_ptr<float>();
      norm = 0.0;
      for (int64_t q = 0; q < p; ++q) norm += cw[q];
      TORCH_CHECK(norm > 0.0, "comparison_weight must have a positive sum");
    }
    for (int64_t q = 0; q < p; ++q) {
      double v, gc, gr;
      comparison_terms(r[c[q]], r[j[q]], m ? m[q] : 0.0, opt, &v, &gc, &gr);
      const double s = (cw ? cw[q] : 1.0) / norm;
      loss += s * v;
      dldr[c[q]] += s * gc;
      dldr[j[q]] += s * gr;
    }
  }
  Tensor dldr_t = at::empty({n}, rewards.options());
  float* g = dldr_t.data_ptr<float>();
  for (int64_t k = 0; k < n; ++k) g[k] = static_cast<float>(dldr[k]);
  return {rewards, at::scalar_tensor(loss, rewards.options()), dldr_t};
}

std::tuple<Tensor, Tensor, Tensor> fused_reward_head_backward(
    const Tensor& hidden_in, const Tensor& weight, const Tensor& reward_positions,
    const Tensor& dloss_drewards, const Tensor& grad_output, bool need_hidden_grad) {
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.device().is_cpu(), "hidden must be a CPU [T, D]");
  const Tensor hidden = hidden_in.stride(1) == 1 ? hidden_in : hidden_in.contiguous();
  const int64_t t = hidden.size(0), d = hidden.size(1), row_stride = hidden.stride(0);
  TORCH_CHECK(weight.numel() == d, "weight must have D = ", d, " elements");
  const Tensor pos = reward_positions.contiguous();
  check_index(pos, t, "reward_positions");
  const int64_t n = pos.numel();
  TORCH_CHECK(dloss_drewards.numel() == n, "dloss_drewards must have N = ", n, " elements");
  const Tensor dl = dloss_drewards.to(at::kFloat).contiguous();
  const double g = grad_output.to(at::kDouble).item<double>();

  // Coefficient per unique row: coef_u = g * sum_{n: pos_n = u} dL/dr_n, summed in n order
  // (stable sort), so a row listed twice gets one row of gradient, accumulated in double.
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* dp = dl.data_ptr<float>();
  std::vector<std::pair<int64_t, int64_t>> order(n);
  for (int64_t k = 0; k < n; ++k) order[k] = {pp[k], k};
  std::stable_sort(order.begin(), order.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<int64_t> rows;
  std::vector<float> coef;
  double bias_grad = 0.0;
  for (int64_t k = 0; k < n;) {
    const int64_t row = order[k].first;
    double acc = 0.0;
    for (; k < n && order[k].first == row; ++k) acc += dp[order[k].second];
    rows.push_back(row);
    coef.push_back(static_cast<float>(g * acc));
    bias_grad += g * acc;
  }
  const int64_t u = static_cast<int64_t>(rows.size());
  const Tensor w32 = weight.reshape({d}).to(at::kFloat).contiguous();
  const float* wp = w32.data_ptr<float>();

  Tensor grad_hidden = need_hidden_grad ? at::zeros({t, d}, hidden.options())
                                        : at::empty({0}, hidden.options());
  Tensor grad_weight = at::empty({d}, hidden.options().dtype(at::kFloat));
  float* gw = grad_weight.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_rh_bwd", [&] {
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    if (need_hidden_grad) {
      scalar_t* gh = grad_hidden.data_ptr<scalar_t>();
      at::parallel_for(0, u, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          scalar_t* out = gh + rows[k] * d;
          const float a = coef[k];
          for (int64_t i = 0; i < d; ++i) out[i] = static_cast<scalar_t>(a * wp[i]);
        }
      });
    }
    // grad_weight over column blocks of D: each block sums the U rows in row order.
    constexpr int64_t kBlock = 256;
    const int64_t nblocks = (d + kBlock - 1) / kBlock;
    at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t d0 = blk * kBlock, d1 = std::min(d, d0 + kBlock);
        float acc[kBlock];
        for (int64_t i = d0; i < d1; ++i) acc[i - d0] = 0.f;
        for (int64_t k = 0; k < u; ++k) {
          const scalar_t* row = h + rows[k] * row_stride;
          const float a = coef[k];
          for (int64_t i = d0; i < d1; ++i) acc[i - d0] += a * to_f(row[i]);
        }
        for (int64_t i = d0; i < d1; ++i) gw[i] = acc[i - d0];
      }
    });
  });
  return {grad_hidden, grad_weight,
          at::scalar_tensor(bias_grad, hidden.options().dtype(at::kFloat))};
}

}  // namespace
}  // namespace fastrm

TORCH_LIBRARY_FRAGMENT(fastrm, m) {
  m.def(
      "fused_reward_head_forward(Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor reward_positions, Tensor chosen_index, Tensor rejected_index, Tensor? margin, "
      "Tensor? comparison_weight, Tensor? contrast_weights, str objective, "
      "float label_smoothing, float hinge_margin, float centering_coefficient) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_reward_head_backward(Tensor hidden, Tensor weight, Tensor reward_positions, "
      "Tensor dloss_drewards, Tensor grad_output, bool need_hidden_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrm, CPU, m) {
  m.impl("fused_reward_head_forward", &fastrm::fused_reward_head_forward);
  m.impl("fused_reward_head_backward", &fastrm::fused_reward_head_backward);
}
