// Interface between varlen_attention.cpp (torch op, generic x86-64 code) and
// varlen_attention_avx512bf16.cpp (the kernels, compiled with AVX-512 BF16 enabled).
//
// Only plain structs and raw pointers cross this boundary: the AVX-512 translation unit must not
// instantiate any inline or template code that the rest of the library also uses (the linker
// would keep one copy, possibly the AVX-512 one, and a CPU without AVX-512 would fault in it).
#pragma once

#include <cstdint>

namespace fastrm {
namespace attn_bf16 {

// One packed row of T tokens. q [T, H, D], k / v [T, Hk, D] bf16 (as uint16 bits), last dim
// contiguous, element strides for the token and head dims. Segment s owns the query tokens
// [q_start[s], q_start[s] + q_len[s]); its keys are the prefix [p_start[s], p_start[s] + p_len[s])
// (p_len[s] == 0: none) plus its own tokens up to and including the query (causal).
// Segments are processed by "key groups": segments that share key tokens (a prompt and the
// responses that use it as prefix) are in one group, so each group writes disjoint dK / dV rows.
// group_segments lists the segments of group g at [group_offsets[g], group_offsets[g + 1]).
// token_local[t] is the row of token t within its group (0 .. group_rows[g] - 1).
struct Problem {
  int64_t T, H, Hk, D;
  float scale;
  const uint16_t* q;
  int64_t q_st, q_sh;
  const uint16_t* k;
  int64_t k_st, k_sh;
  const uint16_t* v;
  int64_t v_st, v_sh;
  int64_t S;
  const int64_t* q_start;
  const int64_t* q_len;
  const int64_t* p_start;
  const int64_t* p_len;
  int64_t G;
  const int64_t* group_offsets;
  const int64_t* group_segments;
  const int64_t* group_rows;
  const int64_t* token_local;
};

// True when this CPU executes AVX-512 F/BW/VL/DQ and AVX512_BF16 (checked at run time).
bool cpu_supported();

// Largest head dim the kernels take (D must also be a multiple of 16).
constexpr int64_t kMaxHeadDim = 256;

// Forward of key group g, kv head kh: out [T, H, D] bf16 (strides o_st, o_sh) for the query
// heads kh * (H / Hk) ... and lse [T, H] fp32 (log-sum-exp of the scaled scores per row).
void forward_task(const Problem& p, int64_t g, int64_t kh, uint16_t* out, int64_t o_st,
                  int64_t o_sh, float* lse);

// Backward of key group g, kv head kh. dout / out [T, H, D] bf16 (strides do_st/do_sh,
// o_st/o_sh are not needed: delta [T, H] = rowsum(dout * out) fp32 is given), lse [T, H].
// Writes dq [T, H, D] rows of the group's queries for heads of kh, and dk, dv [T, Hk, D] rows
// of the group's tokens for head kh (all contiguous, bf16).
void backward_task(const Problem& p, int64_t g, int64_t kh, const uint16_t* dout, int64_t do_st,
                   int64_t do_sh, const float* lse, const float* delta, uint16_t* dq,
                   uint16_t* dk, uint16_t* dv);

}  // namespace attn_bf16
}  // namespace fastrm
