// Row planner for packing preference pairs / groups: best-fit decreasing (BFD) bin packing.
//
// plan_rows_bfd(sizes [n] int64, capacity) -> (items [n] int64, row_offsets [R + 1] int64):
// row r holds items[row_offsets[r]:row_offsets[r + 1]], in placement order (largest first).
//
// Exact rule (fastrm/data/packing.py implements the same rule with numpy, batched per size class,
// and the tests check both give identical rows):
//   * items are visited by size, largest first; equal sizes by ascending index (stable sort);
//   * an item goes to the open row with the smallest remaining capacity that still fits it
//     (best fit); rows with equal remaining capacity are taken first-in first-out (the row that
//     reached that remaining capacity earliest);
//   * when no open row fits, a new row is opened (rows are numbered in opening order).
// Cost: O(n + C) counting sort (C = capacity) plus O(n) placements, done a whole size class at a
// time (see the comment in the loop), with one ordered-set look-up per (size, room) visit.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <deque>
#include <set>
#include <tuple>
#include <numeric>
#include <vector>

namespace fastrm {

std::tuple<at::Tensor, at::Tensor> plan_rows_bfd(const at::Tensor& sizes_in, int64_t capacity) {
  TORCH_CHECK(sizes_in.dim() == 1, "plan_rows_bfd: sizes must be 1-D, got ", sizes_in.dim(), "-D");
  TORCH_CHECK(capacity >= 1, "plan_rows_bfd: capacity must be >= 1, got ", capacity);
  at::Tensor sizes = sizes_in.to(at::kLong).contiguous();
  const int64_t n = sizes.numel();
  const int64_t* s = sizes.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(s[i] >= 1 && s[i] <= capacity, "plan_rows_bfd: item ", i, " has size ", s[i],
                ", outside [1, capacity=", capacity, "]");
  }
  // Counting sort: sizes descending, equal sizes by ascending index (what a stable sort gives).
  std::vector<int64_t> first(capacity + 2, 0);
  for (int64_t i = 0; i < n; ++i) first[s[i]]++;
  int64_t acc = 0;
  for (int64_t v = capacity; v >= 1; --v) {
    const int64_t c = first[v];
    first[v] = acc;
    acc += c;
  }
  std::vector<int64_t> order(n);
  {
    std::vector<int64_t> next(first);
    for (int64_t i = 0; i < n; ++i) order[next[s[i]]++] = i;
  }

  std::vector<int64_t> bin_of(n);
  int64_t* bin = bin_of.data();
  // room -> FIFO of open rows with exactly that room (vector + head index); `open` holds the
  // rooms whose FIFO is non-empty, ordered, for the best-fit look-up.
  std::vector<std::vector<int64_t>> fifo(capacity + 1);
  std::vector<int64_t> head(capacity + 1, 0);
  std::set<int64_t> open;
  auto push = [&](int64_t room, int64_t row) {
    if (room <= 0) return;
    if (fifo[room].size() == static_cast<size_t>(head[room])) open.insert(room);
    fifo[room].push_back(row);
  };
  int64_t num_rows = 0;
  // Items of one size s are placed together. Exactness of the batch (same rows as placing them
  // one at a time): the best-fit row has the least room r >= s; after one item its room r - s
  // is below every other room >= s, so the same row keeps taking items until its room drops
  // under s: each row of room r takes q = r / s items, in FIFO order; only the last row
  // visited may take fewer.
  for (int64_t v = capacity; v >= 1; --v) {
    int64_t pos = first[v];
    const int64_t hi = (v == 1) ? n : first[v - 1];
    while (pos < hi) {
      const int64_t c = hi - pos;
      auto it = open.lower_bound(v);
      if (it == open.end()) {  // no open row fits: open new rows of room `capacity`
        const int64_t q = capacity / v;
        while (pos < hi) {
          const int64_t row = num_rows++;
          const int64_t k = std::min(q, hi - pos);
          for (int64_t t = 0; t < k; ++t) bin[order[pos++]] = row;
          push(capacity - k * v, row);
        }
        break;
      }
      const int64_t r = *it;
      std::vector<int64_t>& rows = fifo[r];
      int64_t h = head[r];
      const int64_t avail = static_cast<int64_t>(rows.size()) - h;
      const int64_t q = r / v;
      const int64_t nfull = std::min(avail, c / q);
      for (int64_t b = 0; b < nfull; ++b) {
        const int64_t row = rows[h + b];
        for (int64_t t = 0; t < q; ++t) bin[order[pos++]] = row;
      }
      int64_t partial = -1, rem = 0;
      if (pos < hi && h + nfull < static_cast<int64_t>(rows.size())) {
        partial = rows[h + nfull];
        rem = hi - pos;
        for (int64_t t = 0; t < rem; ++t) bin[order[pos++]] = partial;
      }
      // rows leave bucket r (FIFO front) and join their new buckets in the same order
      std::vector<int64_t> moved(rows.begin() + h, rows.begin() + h + nfull);
      head[r] = h + nfull + (partial >= 0 ? 1 : 0);
      if (head[r] == static_cast<int64_t>(rows.size())) {
        open.erase(r);
        std::vector<int64_t>().swap(rows);
        head[r] = 0;
      }
      for (int64_t row : moved) push(r - q * v, row);
      if (partial >= 0) push(r - rem * v, partial);
    }
  }
  // Rows as flat arrays: items row by row, each row in placement order (counting sort of the
  // processing order by row id, stable).
  at::Tensor offsets = at::zeros({num_rows + 1}, sizes.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) off[bin[i] + 1]++;
  for (int64_t k = 0; k < num_rows; ++k) off[k + 1] += off[k];
  at::Tensor items = at::empty({n}, sizes.options());
  int64_t* it_out = items.data_ptr<int64_t>();
  std::vector<int64_t> fill(off, off + num_rows);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = order[k];
    it_out[fill[bin[i]]++] = i;
  }
  return {items, offsets};
}

}  // namespace fastrm

TORCH_LIBRARY_FRAGMENT(fastrm, m) {
  m.def("plan_rows_bfd(Tensor sizes, int capacity) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrm, CPU, m) {
  m.impl("plan_rows_bfd", &fastrm::plan_rows_bfd);
}
