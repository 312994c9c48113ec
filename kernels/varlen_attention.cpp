// Packed causal attention with shared prefixes on CPU, bf16: the torch ops around the AVX-512
// BF16 kernels of varlen_attention_avx512bf16.cpp (fastrm.attention backend "cpu_flash").
//
// Rule (fastrm.attention.metadata): token i of segment s attends to the earlier tokens of s
// (itself included) and to every token of s's prefix range. Work is split into tasks
// (key group, kv head), longest first, taken by the threads in turn; each task writes its own
// rows of every output, so results do not depend on the number of threads.
//
// Ops (torch.ops.fastrm.*):
//   varlen_attention_supported() -> bool          (this CPU runs the kernels)
//   varlen_attention_forward(q [T, H, D], k [T, Hk, D], v [T, Hk, D], segments [S, 4],
//       group_offsets [G + 1], group_segments [S], group_rows [G], token_local [T], scale)
//       -> (out [T, H, D] bf16, lse [T, H] f32)
//   varlen_attention_backward(grad_out, q, k, v, out, lse, <same plan>, scale)
//       -> (grad_q [T, H, D], grad_k [T, Hk, D], grad_v [T, Hk, D])   (bf16)
// segments[s] = (q_start, q_len, p_start, p_len); the plan (key groups: segments that share
// key tokens, token_local = row of each token within its group) comes from
// fastrm.attention.metadata.VarlenMetadata.cpu_flash_plan().
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "varlen_attention_avx512bf16.h"

#ifdef FASTRM_NO_AVX512BF16
// Built without the AVX-512 BF16 file (compiler or target without it): the ops exist and say so.
namespace fastrm {
namespace attn_bf16 {
bool cpu_supported() { return false; }
void forward_task(const Problem&, int64_t, int64_t, uint16_t*, int64_t, int64_t, float*) {}
void backward_task(const Problem&, int64_t, int64_t, const uint16_t*, int64_t, int64_t,
                   const float*, const float*, uint16_t*, uint16_t*, uint16_t*) {}
}  // namespace attn_bf16
}  // namespace fastrm
#endif

namespace fastrm {
namespace {

using at::Tensor;

bool supported() {
  static const bool ok = attn_bf16::cpu_supported();
  return ok;
}

struct Plan {
  Tensor seg, offsets, members, rows, local;
  int64_t S = 0, G = 0;
  std::vector<int64_t> q_start, q_len, p_start, p_len;
};

Plan check_plan(const Tensor& segments, const Tensor& group_offsets, const Tensor& group_segments,
                const Tensor& group_rows, const Tensor& token_local, int64_t t) {
  auto i64 = [](const Tensor& x, const char* name) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong, "varlen_attention: ", name,
                " must be a CPU int64 tensor");
    return x.contiguous();
  };
  Plan p;
  p.seg = i64(segments, "segments");
  TORCH_CHECK(p.seg.dim() == 2 && p.seg.size(1) == 4, "varlen_attention: segments must be [S, 4]");
  p.offsets = i64(group_offsets, "group_offsets");
  p.members = i64(group_segments, "group_segments");
  p.rows = i64(group_rows, "group_rows");
  p.local = i64(token_local, "token_local");
  p.S = p.seg.size(0);
  p.G = p.rows.numel();
  TORCH_CHECK(p.offsets.numel() == p.G + 1 && p.members.numel() == p.S && p.local.numel() == t,
              "varlen_attention: plan sizes do not match (S = ", p.S, ", G = ", p.G, ", T = ", t, ")");
  const int64_t* sp = p.seg.data_ptr<int64_t>();
  int64_t expect = 0;
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t qs = sp[4 * s], ql = sp[4 * s + 1], ps = sp[4 * s + 2], pl = sp[4 * s + 3];
    TORCH_CHECK(qs == expect && ql > 0, "varlen_attention: segment ", s, " is [", qs, ", ",
                qs + ql, "); segments must tile [0, T) in order, each non-empty");
    TORCH_CHECK(pl == 0 || (ps >= 0 && pl > 0 && ps + pl <= t), "varlen_attention: prefix of segment ",
                s, " [", ps, ", ", ps + pl, ") is outside [0, ", t, ")");
    p.q_start.push_back(qs);
    p.q_len.push_back(ql);
    p.p_start.push_back(ps);
    p.p_len.push_back(pl);
    expect = qs + ql;
  }
  TORCH_CHECK(expect == t, "varlen_attention: segments end at ", expect, " but T = ", t);
  const int64_t* op = p.offsets.data_ptr<int64_t>();
  TORCH_CHECK(p.G == 0 || (op[0] == 0 && op[p.G] == p.S), "varlen_attention: bad group_offsets");
  const int64_t* mp = p.members.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.S; ++i)
    TORCH_CHECK(mp[i] >= 0 && mp[i] < p.S, "varlen_attention: group_segments out of range");
  return p;
}

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(supported(), "varlen_attention: this CPU lacks AVX-512 BF16 (use the sdpa_segments "
              "backend)");
  for (const Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kBFloat16 && x->dim() == 3,
                "varlen_attention: q, k, v must be CPU bf16 [T, H, D] tensors");
    TORCH_CHECK(x->stride(2) == 1, "varlen_attention: the head dim of q, k, v must be contiguous");
  }
  const int64_t d = q.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == d,
              "varlen_attention: k, v must be [T, H_kv, D] matching q [T, H, D]");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "varlen_attention: H = ", q.size(1),
              " must be a multiple of H_kv = ", k.size(1));
  TORCH_CHECK(d % 16 == 0 && (d <= 128 || d == 256), "varlen_attention: head dim ", d,
              " is not supported (multiples of 16 up to 128, or 256)");
}

attn_bf16::Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Plan& pl,
                                double scale) {
  attn_bf16::Problem p;
  p.T = q.size(0);
  p.H = q.size(1);
  p.Hk = k.size(1);
  p.D = q.size(2);
  p.scale = static_cast<float>(scale);
  p.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  p.q_st = q.stride(0);
  p.q_sh = q.stride(1);
  p.k = reinterpret_cast<const uint16_t*>(k.data_ptr());
  p.k_st = k.stride(0);
  p.k_sh = k.stride(1);
  p.v = reinterpret_cast<const uint16_t*>(v.data_ptr());
  p.v_st = v.stride(0);
  p.v_sh = v.stride(1);
  p.S = pl.S;
  p.q_start = pl.q_start.data();
  p.q_len = pl.q_len.data();
  p.p_start = pl.p_start.data();
  p.p_len = pl.p_len.data();
  p.G = pl.G;
  p.group_offsets = pl.offsets.data_ptr<int64_t>();
  p.group_segments = pl.members.data_ptr<int64_t>();
  p.group_rows = pl.rows.data_ptr<int64_t>();
  p.token_local = pl.local.data_ptr<int64_t>();
  return p;
}

// Runs fn(group, kv_head) for every task, most expensive groups first, threads taking the next
// task as they finish (segment costs vary by orders of magnitude).
template <typename Fn>
void run_tasks(const attn_bf16::Problem& p, Fn fn) {
  std::vector<double> cost(p.G, 0.0);
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t i = p.group_offsets[g]; i < p.group_offsets[g + 1]; ++i) {
      const int64_t s = p.group_segments[i];
      cost[g] += static_cast<double>(p.q_len[s]) * (p.p_len[s] + 0.5 * p.q_len[s] + 64.0);
    }
  std::vector<int64_t> order(p.G);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int64_t ntasks = p.G * p.Hk;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      for (int64_t i = next.fetch_add(1); i < ntasks; i = next.fetch_add(1))
        fn(order[i / p.Hk], i % p.Hk);
    }
  });
}

std::tuple<Tensor, Tensor> varlen_attention_forward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& segments,
    const Tensor& group_offsets, const Tensor& group_segments, const Tensor& group_rows,
    const Tensor& token_local, double scale) {
  check_qkv(q, k, v);
  const Plan pl = check_plan(segments, group_offsets, group_segments, group_rows, token_local, q.size(0));
  const attn_bf16::Problem p = make_problem(q, k, v, pl, scale);
  Tensor out = at::empty({p.T, p.H, p.D}, q.options());
  Tensor lse = at::empty({p.T, p.H}, q.options().dtype(at::kFloat));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  float* lp = lse.data_ptr<float>();
  run_tasks(p, [&](int64_t g, int64_t kh) {
    attn_bf16::forward_task(p, g, kh, op, p.H * p.D, p.D, lp);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_attention_backward(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& segments, const Tensor& group_offsets,
    const Tensor& group_segments, const Tensor& group_rows, const Tensor& token_local,
    double scale) {
  check_qkv(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == at::kBFloat16,
              "varlen_attention: grad_out and out must be bf16 like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1),
              "varlen_attention: lse must be [T, H] float32");
  const Plan pl = check_plan(segments, group_offsets, group_segments, group_rows, token_local, q.size(0));
  const attn_bf16::Problem p = make_problem(q, k, v, pl, scale);
  const Tensor dout = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  const Tensor lse_c = lse.contiguous();
  // delta = rowsum(dO * O) in fp32, the softmax backward's per-row term
  const Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  Tensor dq = at::empty({p.T, p.H, p.D}, q.options());
  Tensor dk = at::empty({p.T, p.Hk, p.D}, q.options());
  Tensor dv = at::empty({p.T, p.Hk, p.D}, q.options());
  const uint16_t* dop = reinterpret_cast<const uint16_t*>(dout.data_ptr());
  run_tasks(p, [&](int64_t g, int64_t kh) {
    attn_bf16::backward_task(p, g, kh, dop, dout.stride(0), dout.stride(1), lse_c.data_ptr<float>(),
                             delta.data_ptr<float>(), reinterpret_cast<uint16_t*>(dq.data_ptr()),
                             reinterpret_cast<uint16_t*>(dk.data_ptr()),
                             reinterpret_cast<uint16_t*>(dv.data_ptr()));
  });
  return {dq, dk, dv};
}

bool varlen_attention_supported() { return supported(); }

}  // namespace
}  // namespace fastrm

TORCH_LIBRARY_FRAGMENT(fastrm, m) {
  m.def("varlen_attention_supported() -> bool", &fastrm::varlen_attention_supported);
  m.def("varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor segments, "
        "Tensor group_offsets, Tensor group_segments, Tensor group_rows, Tensor token_local, "
        "float scale) -> (Tensor, Tensor)");
  m.def("varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor segments, Tensor group_offsets, Tensor group_segments, "
        "Tensor group_rows, Tensor token_local, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrm, CPU, m) {
  m.impl("varlen_attention_forward", &fastrm::varlen_attention_forward);
  m.impl("varlen_attention_backward", &fastrm::varlen_attention_backward);
}
