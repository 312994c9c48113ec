// Packed (varlen) causal attention with shared prefixes, bf16, for CPUs with AVX-512 BF16.
//
// FlashAttention-2's algorithm on a CPU core: scores S = Q K^T are accumulated in fp32 by
// VDPBF16PS (bf16 pairs -> fp32), the softmax runs online per row in fp32, P and dS are
// rounded to bf16 for the next products (as the GPU kernels do), nothing of size [L, L] is
// stored. The backward recomputes S from the saved log-sum-exp.
//
// Layouts. A "tile" is M = g * bq query rows (the g query heads that share kv head kh, times
// bq positions; row m = head j * bq + position i) by BK = 64 keys. Keys are packed once per key
// range (a segment's own tokens, or a prefix) and kv head:
//   nt layout [nblk][D/2][BK][2]  -- for products that reduce over D (S = Q K^T, dP = dO V^T)
//   nn layout [nblk][BK/2][D][2]  -- for products that reduce over keys (O += P V, dQ += dS K)
// Query-side operands reduced over rows (dV += P^T dO, dK += dS^T Q) use [M/2][D][2] layouts of
// Q and dO, and P / dS pairs along rows. Two micro-kernels cover all seven products:
//   gemm_nt: C[M][BK] = A[M][D] . B_nt          (register tile 4 rows x 64 keys)
//   gemm_nn: C[R][D] += A32(r, p) . B_nn[p]     (register tile 16/NV rows x D, NV = D / 16)
//
// This file is compiled with AVX-512 enabled and only entered after cpu_supported(): see the
// header for why nothing here may be shared inline / template code.
#include "varlen_attention_avx512bf16.h"

#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

namespace fastrm {
namespace attn_bf16 {
namespace {

constexpr int64_t BK = 64;  // keys per block
constexpr int64_t BQ = 64;  // query positions per block (each times the g heads of a kv head)

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Growable 64-byte aligned scratch (no std containers in this file, see the header).
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(ptr); }
  void* reserve(size_t n) {
    if (n > bytes) {
      std::free(ptr);
      bytes = static_cast<size_t>(round_up(static_cast<int64_t>(n), 64));
      ptr = std::aligned_alloc(64, bytes);
      if (ptr == nullptr) {
        bytes = 0;
        throw std::bad_alloc();
      }
    }
    return ptr;
  }
};

// Carves typed arrays out of one Scratch.
struct Arena {
  char* base;
  size_t used = 0;
  explicit Arena(void* p) : base(static_cast<char*>(p)) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(base + used);
    used += static_cast<size_t>(round_up(count * static_cast<int64_t>(sizeof(T)), 64));
    return p;
  }
};
template <typename T>
size_t arena_bytes(int64_t count) {
  return static_cast<size_t>(round_up(count * static_cast<int64_t>(sizeof(T)), 64));
}

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// ---------------------------------------------------------------------------------------------
// math helpers
// ---------------------------------------------------------------------------------------------
// exp for fp32 lanes (Cephes expf: n = round(x / ln 2), degree-6 polynomial, 2^n by scalef).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, fx);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (f != f) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// 16 fp32 -> 16 bf16 (round to nearest even).
inline __m256i cvt16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// Rows a, b (16 fp32 each) -> 16 int32 lanes holding the bf16 pairs (a[l], b[l]).
inline __m512i pair_rows(__m512 a, __m512 b) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512bh both = _mm512_cvtne2ps_pbh(b, a);  // words 0..15 = a, 16..31 = b
  return _mm512_permutexvar_epi16(idx, (__m512i)both);
}

// Key-validity mask of 16 lanes starting at key index k0: k < n and (causal) k <= last.
inline __mmask16 key_mask(int64_t k0, int64_t n, int64_t last) {
  const int64_t lim = imin(n - 1, last);  // largest allowed key index
  if (lim < k0) return 0;
  if (lim >= k0 + 15) return 0xFFFF;
  return static_cast<__mmask16>((1u << (lim - k0 + 1)) - 1u);
}

// ---------------------------------------------------------------------------------------------
// micro-kernels
// ---------------------------------------------------------------------------------------------
// C[M][BK] = sum_p A32[m][p] * B[p][.] with A row-major bf16 [M][lda], B nt-packed
// [D/2][BK][2]; M a multiple of 4.
void gemm_nt(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t d2, float* C, int64_t M) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    __m512 c[4][4];
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_ps();
    const int32_t* a0 = reinterpret_cast<const int32_t*>(A + (m0 + 0) * lda);
    const int32_t* a1 = reinterpret_cast<const int32_t*>(A + (m0 + 1) * lda);
    const int32_t* a2 = reinterpret_cast<const int32_t*>(A + (m0 + 2) * lda);
    const int32_t* a3 = reinterpret_cast<const int32_t*>(A + (m0 + 3) * lda);
    for (int64_t p = 0; p < d2; ++p) {
      const uint16_t* bp = B + p * BK * 2;
      __m512bh b[4];
      for (int v = 0; v < 4; ++v) b[v] = as_bh(_mm512_loadu_si512(bp + v * 32));
      const __m512bh x0 = as_bh(_mm512_set1_epi32(a0[p]));
      const __m512bh x1 = as_bh(_mm512_set1_epi32(a1[p]));
      const __m512bh x2 = as_bh(_mm512_set1_epi32(a2[p]));
      const __m512bh x3 = as_bh(_mm512_set1_epi32(a3[p]));
      for (int v = 0; v < 4; ++v) {
        c[0][v] = _mm512_dpbf16_ps(c[0][v], x0, b[v]);
        c[1][v] = _mm512_dpbf16_ps(c[1][v], x1, b[v]);
        c[2][v] = _mm512_dpbf16_ps(c[2][v], x2, b[v]);
        c[3][v] = _mm512_dpbf16_ps(c[3][v], x3, b[v]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(C + (m0 + r) * BK + v * 16, c[r][v]);
  }
}

// C[r][0..D) += sum_{p < k2} A32(r, p) * B[p][.][2], A32(r, p) = a[r * sr + p * sp] (bf16 pairs
// as int32), B nn-packed [k2][D][2], D = 16 * NV; rows a multiple of RT.
template <int NV>
void gemm_nn(const int32_t* a, int64_t sr, int64_t sp, int64_t rows, const uint16_t* B,
             int64_t k2, float* C, int64_t ldc) {
  constexpr int RT = NV >= 16 ? 1 : (NV >= 8 ? 2 : (NV >= 4 ? 4 : 8));
  constexpr int64_t D = 16 * NV;
  for (int64_t r0 = 0; r0 < rows; r0 += RT) {
    __m512 c[RT][NV];
    for (int r = 0; r < RT; ++r)
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_loadu_ps(C + (r0 + r) * ldc + v * 16);
    const int32_t* ar = a + r0 * sr;
    for (int64_t p = 0; p < k2; ++p) {
      const uint16_t* bp = B + p * D * 2;
      __m512bh b[NV];
      for (int v = 0; v < NV; ++v) b[v] = as_bh(_mm512_loadu_si512(bp + v * 32));
      for (int r = 0; r < RT; ++r) {
        const __m512bh x = as_bh(_mm512_set1_epi32(ar[r * sr + p * sp]));
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], x, b[v]);
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + (r0 + r) * ldc + v * 16, c[r][v]);
  }
}

using GemmNN = void (*)(const int32_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                        float*, int64_t);

GemmNN pick_gemm_nn(int64_t d) {
  switch (d / 16) {
    case 1: return &gemm_nn<1>;
    case 2: return &gemm_nn<2>;
    case 3: return &gemm_nn<3>;
    case 4: return &gemm_nn<4>;
    case 5: return &gemm_nn<5>;
    case 6: return &gemm_nn<6>;
    case 7: return &gemm_nn<7>;
    case 8: return &gemm_nn<8>;
    case 16: return &gemm_nn<16>;
    default: return nullptr;
  }
}

// ---------------------------------------------------------------------------------------------
// packing
// ---------------------------------------------------------------------------------------------
// Rows x[j] (j < n, bf16 [D] each at src + j * st) of one key range -> nt layout, zero padded
// to nblk * BK keys: dst[b][p][jj][e] = x[b * BK + jj][2p + e].
void pack_nt(const uint16_t* src, int64_t st, int64_t n, int64_t d, int64_t nblk, uint16_t* dst) {
  std::memset(dst, 0, static_cast<size_t>(nblk * BK * d) * 2);
  const int64_t d2 = d / 2;
  int32_t* out = reinterpret_cast<int32_t*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    const int32_t* row = reinterpret_cast<const int32_t*>(src + j * st);
    int32_t* blk = out + (j / BK) * d2 * BK + (j % BK);
    for (int64_t p = 0; p < d2; ++p) blk[p * BK] = row[p];
  }
}

// Rows x[j] -> nn layout [nblk][BK/2][D][2]: dst[b][p][c][e] = x[b * BK + 2p + e][c].
void pack_nn(const uint16_t* src, int64_t st, int64_t n, int64_t d, int64_t nblk, uint16_t* dst) {
  std::memset(dst, 0, static_cast<size_t>(nblk * BK * d) * 2);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* row = src + j * st;
    uint16_t* o = dst + (j / BK) * BK * d + ((j % BK) / 2) * d * 2 + (j % 2);
    for (int64_t c = 0; c < d; ++c) o[2 * c] = row[c];
  }
}

// Query-side rows (M of them, row-major [M][D]) -> [M/2][D][2].
void pack_rows_nn(const uint16_t* rows, int64_t m, int64_t d, uint16_t* dst) {
  for (int64_t r = 0; r < m; r += 2) {
    const uint16_t* a = rows + r * d;
    const uint16_t* b = rows + (r + 1) * d;
    uint16_t* o = dst + (r / 2) * d * 2;
    for (int64_t c = 0; c < d; ++c) {
      o[2 * c] = a[c];
      o[2 * c + 1] = b[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// key ranges of a group: packed once per (group, kv head) task
// ---------------------------------------------------------------------------------------------
struct Range {
  int64_t start, len, nblk;
  uint16_t* k_nt;
  uint16_t* v_nn;  // forward
  uint16_t* v_nt;  // backward
  uint16_t* k_nn;  // backward
  float* dk;       // backward, [nblk * BK][D] fp32
  float* dv;
};

struct RangeSet {
  Range* items;
  int64_t count = 0;
  int64_t find(int64_t start, int64_t len) const {
    for (int64_t i = 0; i < count; ++i)
      if (items[i].start == start && items[i].len == len) return i;
    return -1;
  }
};

// Distinct key ranges (prefixes and own token ranges) of group g, in first-use order.
int64_t collect_ranges(const Problem& p, int64_t g, int64_t* starts, int64_t* lens) {
  int64_t n = 0;
  auto add = [&](int64_t s, int64_t l) {
    for (int64_t i = 0; i < n; ++i)
      if (starts[i] == s && lens[i] == l) return;
    starts[n] = s;
    lens[n] = l;
    ++n;
  };
  for (int64_t i = p.group_offsets[g]; i < p.group_offsets[g + 1]; ++i) {
    const int64_t s = p.group_segments[i];
    if (p.p_len[s] > 0) add(p.p_start[s], p.p_len[s]);
    add(p.q_start[s], p.q_len[s]);
  }
  return n;
}

// The key ranges segment sg attends to, prefix first: rs[i] and whether it is the segment's own
// (causal) range; returns how many (1 or 2).
int64_t segment_ranges(const Problem& p, const RangeSet& ranges, int64_t sg, const Range** rs,
                       bool* own) {
  int64_t n = 0;
  if (p.p_len[sg] > 0) {
    rs[n] = &ranges.items[ranges.find(p.p_start[sg], p.p_len[sg])];
    own[n++] = false;
  }
  rs[n] = &ranges.items[ranges.find(p.q_start[sg], p.q_len[sg])];
  own[n++] = true;
  return n;
}

thread_local Scratch tl_ranges, tl_work, tl_seg;

// Packs the group's ranges for kv head kh into tl_ranges; `backward` adds v_nt, k_nn and the
// fp32 dK / dV accumulators (zeroed).
RangeSet pack_group(const Problem& p, int64_t g, int64_t kh, bool backward) {
  const int64_t nseg = p.group_offsets[g + 1] - p.group_offsets[g];
  const int64_t max_ranges = 2 * nseg;
  // first pass: the ranges and the bytes they need
  size_t meta = arena_bytes<Range>(max_ranges) + 2 * arena_bytes<int64_t>(max_ranges);
  void* tmp = tl_work.reserve(meta);
  Arena ta(tmp);
  ta.take<Range>(max_ranges);
  int64_t* starts = ta.take<int64_t>(max_ranges);
  int64_t* lens = ta.take<int64_t>(max_ranges);
  const int64_t nr = collect_ranges(p, g, starts, lens);
  size_t bytes = arena_bytes<Range>(nr);
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t keys = round_up(lens[i], BK);
    bytes += (backward ? 3 : 2) * arena_bytes<uint16_t>(keys * p.D);
    if (backward) bytes += 2 * arena_bytes<float>(keys * p.D);
  }
  Arena ra(tl_ranges.reserve(bytes));
  RangeSet set;
  set.items = ra.take<Range>(nr);
  set.count = nr;
  for (int64_t i = 0; i < nr; ++i) {
    Range& r = set.items[i];
    r.start = starts[i];
    r.len = lens[i];
    r.nblk = round_up(r.len, BK) / BK;
    const int64_t keys = r.nblk * BK;
    const uint16_t* kp = p.k + r.start * p.k_st + kh * p.k_sh;
    const uint16_t* vp = p.v + r.start * p.v_st + kh * p.v_sh;
    r.k_nt = ra.take<uint16_t>(keys * p.D);
    pack_nt(kp, p.k_st, r.len, p.D, r.nblk, r.k_nt);
    if (backward) {
      r.v_nt = ra.take<uint16_t>(keys * p.D);
      pack_nt(vp, p.v_st, r.len, p.D, r.nblk, r.v_nt);
      r.k_nn = ra.take<uint16_t>(keys * p.D);
      pack_nn(kp, p.k_st, r.len, p.D, r.nblk, r.k_nn);
      r.dk = ra.take<float>(keys * p.D);
      r.dv = ra.take<float>(keys * p.D);
      std::memset(r.dk, 0, static_cast<size_t>(keys * p.D) * 4);
      std::memset(r.dv, 0, static_cast<size_t>(keys * p.D) * 4);
      r.v_nn = nullptr;
    } else {
      r.v_nn = ra.take<uint16_t>(keys * p.D);
      pack_nn(vp, p.v_st, r.len, p.D, r.nblk, r.v_nn);
      r.v_nt = r.k_nn = nullptr;
      r.dk = r.dv = nullptr;
    }
  }
  return set;
}

// Gathers the query-side rows of one tile: rows[m][.] = x[token i0 + i][head kh * gq + j] for
// m = j * bq + i (zero rows past the segment's end).
void gather_tile(const uint16_t* x, int64_t st, int64_t sh, int64_t q0, int64_t nvalid,
                 int64_t kh, int64_t gq, int64_t bq, int64_t d, uint16_t* rows) {
  for (int64_t j = 0; j < gq; ++j)
    for (int64_t i = 0; i < bq; ++i) {
      uint16_t* dst = rows + (j * bq + i) * d;
      if (i < nvalid)
        std::memcpy(dst, x + (q0 + i) * st + (kh * gq + j) * sh, static_cast<size_t>(d) * 2);
      else
        std::memset(dst, 0, static_cast<size_t>(d) * 2);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// public entry points
// ---------------------------------------------------------------------------------------------
bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

void forward_task(const Problem& p, int64_t g, int64_t kh, uint16_t* out, int64_t o_st,
                  int64_t o_sh, float* lse) {
  const int64_t d = p.D, gq = p.H / p.Hk;
  const GemmNN gemm_nn_d = pick_gemm_nn(d);
  RangeSet ranges = pack_group(p, g, kh, /*backward=*/false);
  const int64_t max_m = gq * BQ;
  Arena wa(tl_seg.reserve(arena_bytes<uint16_t>(max_m * d) + arena_bytes<float>(max_m * BK) +
                          arena_bytes<uint16_t>(max_m * BK) + arena_bytes<float>(max_m * d) +
                          2 * arena_bytes<float>(max_m)));
  uint16_t* qt = wa.take<uint16_t>(max_m * d);
  float* s = wa.take<float>(max_m * BK);
  uint16_t* pb = wa.take<uint16_t>(max_m * BK);
  float* o = wa.take<float>(max_m * d);
  float* mrow = wa.take<float>(max_m);
  float* lrow = wa.take<float>(max_m);
  const __m512 scale = _mm512_set1_ps(p.scale);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t gi = p.group_offsets[g]; gi < p.group_offsets[g + 1]; ++gi) {
    const int64_t sg = p.group_segments[gi];
    const int64_t q0 = p.q_start[sg], lq = p.q_len[sg];
    const int64_t bq = imin(BQ, round_up(lq, 8));
    const int64_t m = gq * bq;
    const Range* rs[2];
    bool own[2];
    const int64_t nrange = segment_ranges(p, ranges, sg, rs, own);
    for (int64_t i0 = 0; i0 < lq; i0 += bq) {
      const int64_t nvalid = imin(bq, lq - i0);
      gather_tile(p.q, p.q_st, p.q_sh, q0 + i0, nvalid, kh, gq, bq, d, qt);
      for (int64_t r = 0; r < m; ++r) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
      }
      std::memset(o, 0, static_cast<size_t>(m * d) * 4);
      for (int64_t ri = 0; ri < nrange; ++ri) {
        const Range& rg = *rs[ri];
        const int64_t kend = own[ri] ? imin(rg.len, i0 + bq) : rg.len;
        for (int64_t j0 = 0; j0 < kend; j0 += BK) {
          const int64_t b = j0 / BK;
          gemm_nt(qt, d, rg.k_nt + b * BK * d, d / 2, s, m);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = r % bq;
            uint16_t* prow = pb + r * BK;
            if (i >= nvalid) {
              std::memset(prow, 0, BK * 2);
              continue;
            }
            const int64_t last = own[ri] ? i0 + i : rg.len;
            __m512 sv[4];
            __mmask16 mk[4];
            __m512 mx = ninf;
            for (int v = 0; v < 4; ++v) {
              mk[v] = key_mask(j0 + 16 * v, rg.len, last);
              sv[v] = _mm512_mask_mov_ps(ninf, mk[v], _mm512_mul_ps(_mm512_loadu_ps(s + r * BK + 16 * v), scale));
              mx = _mm512_max_ps(mx, sv[v]);
            }
            const float bmax = _mm512_reduce_max_ps(mx);
            const float mnew = bmax > mrow[r] ? bmax : mrow[r];
            if (mnew == -INFINITY) {  // nothing visible yet in this row
              std::memset(prow, 0, BK * 2);
              continue;
            }
            const float alpha = mrow[r] == -INFINITY ? 0.0f : std::exp(mrow[r] - mnew);
            const __m512 mv = _mm512_set1_ps(mnew);
            __m512 sum = _mm512_setzero_ps();
            for (int v = 0; v < 4; ++v) {
              const __m512 pv = _mm512_maskz_mov_ps(mk[v], exp512(_mm512_sub_ps(sv[v], mv)));
              sum = _mm512_add_ps(sum, pv);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + 16 * v), cvt16(pv));
            }
            lrow[r] = lrow[r] * alpha + _mm512_reduce_add_ps(sum);
            mrow[r] = mnew;
            if (alpha != 1.0f) {
              const __m512 av = _mm512_set1_ps(alpha);
              float* orow = o + r * d;
              for (int64_t c = 0; c < d; c += 16)
                _mm512_storeu_ps(orow + c, _mm512_mul_ps(_mm512_loadu_ps(orow + c), av));
            }
          }
          gemm_nn_d(reinterpret_cast<const int32_t*>(pb), BK / 2, 1, m, rg.v_nn + b * BK * d,
                    BK / 2, o, d);
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        const int64_t j = r / bq, i = r % bq;
        if (i >= nvalid) continue;
        const int64_t tok = q0 + i0 + i, h = kh * gq + j;
        const float inv = 1.0f / lrow[r];
        uint16_t* dst = out + tok * o_st + h * o_sh;
        const float* orow = o + r * d;
        for (int64_t c = 0; c < d; c += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                              cvt16(_mm512_mul_ps(_mm512_loadu_ps(orow + c), _mm512_set1_ps(inv))));
        lse[tok * p.H + h] = mrow[r] + std::log(lrow[r]);
      }
    }
  }
}

void backward_task(const Problem& p, int64_t g, int64_t kh, const uint16_t* dout, int64_t do_st,
                   int64_t do_sh, const float* lse, const float* delta, uint16_t* dq,
                   uint16_t* dk, uint16_t* dv) {
  const int64_t d = p.D, gq = p.H / p.Hk;
  const GemmNN gemm_nn_d = pick_gemm_nn(d);
  RangeSet ranges = pack_group(p, g, kh, /*backward=*/true);
  const int64_t max_m = gq * BQ;
  const __m512 scale = _mm512_set1_ps(p.scale);
  // tile scratch
  Arena wa(tl_work.reserve(2 * arena_bytes<float>(max_m * BK) + arena_bytes<uint16_t>(max_m * BK) +
                           2 * arena_bytes<int32_t>(max_m / 2 * BK)));
  float* s = wa.take<float>(max_m * BK);   // P
  float* dp = wa.take<float>(max_m * BK);  // dP, then dS
  uint16_t* dsb = wa.take<uint16_t>(max_m * BK);
  int32_t* pt = wa.take<int32_t>(max_m / 2 * BK);
  int32_t* dst_ = wa.take<int32_t>(max_m / 2 * BK);
  for (int64_t gi = p.group_offsets[g]; gi < p.group_offsets[g + 1]; ++gi) {
    const int64_t sg = p.group_segments[gi];
    const int64_t q0 = p.q_start[sg], lq = p.q_len[sg];
    const int64_t bq = imin(BQ, round_up(lq, 8));
    const int64_t m = gq * bq;
    const int64_t nqb = (lq + bq - 1) / bq;
    // per-segment query-side operands, tile by tile
    Arena sa(tl_seg.reserve(4 * arena_bytes<uint16_t>(nqb * m * d) + 2 * arena_bytes<float>(nqb * m) +
                            arena_bytes<float>(nqb * m * d)));
    uint16_t* qrows = sa.take<uint16_t>(nqb * m * d);
    uint16_t* qnn = sa.take<uint16_t>(nqb * m * d);
    uint16_t* dorows = sa.take<uint16_t>(nqb * m * d);
    uint16_t* donn = sa.take<uint16_t>(nqb * m * d);
    float* lser = sa.take<float>(nqb * m);
    float* deltar = sa.take<float>(nqb * m);
    float* dqacc = sa.take<float>(nqb * m * d);
    std::memset(dqacc, 0, static_cast<size_t>(nqb * m * d) * 4);
    for (int64_t t = 0; t < nqb; ++t) {
      const int64_t i0 = t * bq, nvalid = imin(bq, lq - i0);
      gather_tile(p.q, p.q_st, p.q_sh, q0 + i0, nvalid, kh, gq, bq, d, qrows + t * m * d);
      gather_tile(dout, do_st, do_sh, q0 + i0, nvalid, kh, gq, bq, d, dorows + t * m * d);
      pack_rows_nn(qrows + t * m * d, m, d, qnn + t * m * d);
      pack_rows_nn(dorows + t * m * d, m, d, donn + t * m * d);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t j = r / bq, i = r % bq;
        const int64_t tok = q0 + i0 + i, h = kh * gq + j;
        lser[t * m + r] = i < nvalid ? lse[tok * p.H + h] : INFINITY;
        deltar[t * m + r] = i < nvalid ? delta[tok * p.H + h] : 0.0f;
      }
    }
    const Range* rs[2];
    bool own[2];
    const int64_t nrange = segment_ranges(p, ranges, sg, rs, own);
    for (int64_t ri = 0; ri < nrange; ++ri) {
      const Range& rg = *rs[ri];
      for (int64_t b = 0; b < rg.nblk; ++b) {
        const int64_t j0 = b * BK;
        for (int64_t t = 0; t < nqb; ++t) {
          const int64_t i0 = t * bq, nvalid = imin(bq, lq - i0);
          if (own[ri] && i0 + nvalid - 1 < j0) continue;  // tile above the diagonal
          const uint16_t* qt = qrows + t * m * d;
          gemm_nt(qt, d, rg.k_nt + b * BK * d, d / 2, s, m);
          gemm_nt(dorows + t * m * d, d, rg.v_nt + b * BK * d, d / 2, dp, m);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = r % bq;
            const int64_t last = own[ri] ? i0 + i : rg.len;
            const __m512 l = _mm512_set1_ps(lser[t * m + r]);
            const __m512 dl = _mm512_set1_ps(deltar[t * m + r]);
            for (int v = 0; v < 4; ++v) {
              const __mmask16 mk = i < nvalid ? key_mask(j0 + 16 * v, rg.len, last) : 0;
              float* sp = s + r * BK + 16 * v;
              float* dpp = dp + r * BK + 16 * v;
              const __m512 pv = _mm512_maskz_mov_ps(
                  mk, exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(sp), scale), l)));
              const __m512 ds = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dpp), dl));
              _mm512_storeu_ps(sp, pv);
              _mm512_storeu_ps(dpp, ds);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsb + r * BK + 16 * v), cvt16(ds));
            }
          }
          // P and dS as bf16 pairs along rows: [m/2][BK] int32
          for (int64_t r = 0; r < m; r += 2)
            for (int v = 0; v < 4; ++v) {
              _mm512_storeu_si512(pt + (r / 2) * BK + 16 * v,
                                  pair_rows(_mm512_loadu_ps(s + r * BK + 16 * v),
                                            _mm512_loadu_ps(s + (r + 1) * BK + 16 * v)));
              _mm512_storeu_si512(dst_ + (r / 2) * BK + 16 * v,
                                  pair_rows(_mm512_loadu_ps(dp + r * BK + 16 * v),
                                            _mm512_loadu_ps(dp + (r + 1) * BK + 16 * v)));
            }
          // dV[b] += P^T dO ; dK[b] += dS^T Q ; dQ[t] += dS K[b]
          gemm_nn_d(pt, 1, BK, BK, donn + t * m * d, m / 2, rg.dv + b * BK * d, d);
          gemm_nn_d(dst_, 1, BK, BK, qnn + t * m * d, m / 2, rg.dk + b * BK * d, d);
          gemm_nn_d(reinterpret_cast<const int32_t*>(dsb), BK / 2, 1, m, rg.k_nn + b * BK * d,
                    BK / 2, dqacc + t * m * d, d);
        }
      }
    }
    // dQ of the segment (times the softmax scale)
    for (int64_t t = 0; t < nqb; ++t) {
      const int64_t i0 = t * bq, nvalid = imin(bq, lq - i0);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t j = r / bq, i = r % bq;
        if (i >= nvalid) continue;
        uint16_t* dst = dq + ((q0 + i0 + i) * p.H + kh * gq + j) * d;
        const float* src = dqacc + (t * m + r) * d;
        for (int64_t c = 0; c < d; c += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                              cvt16(_mm512_mul_ps(_mm512_loadu_ps(src + c), scale)));
      }
    }
  }
  // dK, dV of the group's tokens: each range's accumulators summed per token (fp32), then
  // written once as bf16
  const int64_t rows = p.group_rows[g];
  Arena ga(tl_seg.reserve(2 * arena_bytes<float>(rows * d)));
  float* dka = ga.take<float>(rows * d);
  float* dva = ga.take<float>(rows * d);
  std::memset(dka, 0, static_cast<size_t>(rows * d) * 4);
  std::memset(dva, 0, static_cast<size_t>(rows * d) * 4);
  for (int64_t i = 0; i < ranges.count; ++i) {
    const Range& rg = ranges.items[i];
    for (int64_t j = 0; j < rg.len; ++j) {
      const int64_t row = p.token_local[rg.start + j];
      float* a = dka + row * d;
      float* b = dva + row * d;
      const float* x = rg.dk + j * d;
      const float* y = rg.dv + j * d;
      for (int64_t c = 0; c < d; c += 16) {
        _mm512_storeu_ps(a + c, _mm512_add_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(x + c)));
        _mm512_storeu_ps(b + c, _mm512_add_ps(_mm512_loadu_ps(b + c), _mm512_loadu_ps(y + c)));
      }
    }
  }
  for (int64_t gi = p.group_offsets[g]; gi < p.group_offsets[g + 1]; ++gi) {
    const int64_t sg = p.group_segments[gi];
    for (int64_t tok = p.q_start[sg]; tok < p.q_start[sg] + p.q_len[sg]; ++tok) {
      const int64_t row = p.token_local[tok];
      uint16_t* kd = dk + (tok * p.Hk + kh) * d;
      uint16_t* vd = dv + (tok * p.Hk + kh) * d;
      for (int64_t c = 0; c < d; c += 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(kd + c),
                            cvt16(_mm512_mul_ps(_mm512_loadu_ps(dka + row * d + c), scale)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vd + c), cvt16(_mm512_loadu_ps(dva + row * d + c)));
      }
    }
  }
}

}  // namespace attn_bf16
}  // namespace fastrm
