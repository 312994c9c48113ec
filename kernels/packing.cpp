// Row planner for packing preference pairs / groups: best-fit decreasing (BFD) bin packing.
//
// plan_rows_bfd(sizes [n] int64, capacity) -> bin [n] int64 (row id of every item).
//
// Exact rule (fastrm/data/packing.py implements the same rule with numpy, batched per size class,
// and the tests check both give identical rows):
//   * items are visited by size, largest first; equal sizes by ascending index (stable sort);
//   * an item goes to the open row with the smallest remaining capacity that still fits it
//     (best fit); rows with equal remaining capacity are taken first-in first-out (the row that
//     reached that remaining capacity earliest);
//   * when no open row fits, a new row is opened (rows are numbered in opening order).
// Cost: O(n log n) for the sort plus O(n log C) for the bucket look-ups (C = distinct remaining
// capacities held in an ordered map).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <deque>
#include <map>
#include <numeric>
#include <vector>

namespace fastrm {

at::Tensor plan_rows_bfd(const at::Tensor& sizes_in, int64_t capacity) {
  TORCH_CHECK(sizes_in.dim() == 1, "plan_rows_bfd: sizes must be 1-D, got ", sizes_in.dim(), "-D");
  TORCH_CHECK(capacity >= 1, "plan_rows_bfd: capacity must be >= 1, got ", capacity);
  at::Tensor sizes = sizes_in.to(at::kLong).contiguous();
  const int64_t n = sizes.numel();
  const int64_t* s = sizes.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(s[i] >= 1 && s[i] <= capacity, "plan_rows_bfd: item ", i, " has size ", s[i],
                ", outside [1, capacity=", capacity, "]");
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [s](int64_t a, int64_t b) { return s[a] > s[b]; });

  at::Tensor out = at::empty({n}, sizes.options());
  int64_t* bin = out.data_ptr<int64_t>();
  // remaining capacity -> FIFO queue of open rows with exactly that remaining capacity
  std::map<int64_t, std::deque<int64_t>> buckets;
  int64_t num_rows = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t item = order[k];
    const int64_t size = s[item];
    auto it = buckets.lower_bound(size);
    int64_t row, remaining;
    if (it == buckets.end()) {
      row = num_rows++;
      remaining = capacity;
    } else {
      remaining = it->first;
      row = it->second.front();
      it->second.pop_front();
      if (it->second.empty()) buckets.erase(it);
    }
    bin[item] = row;
    remaining -= size;
    if (remaining > 0) buckets[remaining].push_back(row);
  }
  return out;
}

}  // namespace fastrm

TORCH_LIBRARY_FRAGMENT(fastrm, m) {
  m.def("plan_rows_bfd(Tensor sizes, int capacity) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastrm, CPU, m) {
  m.impl("plan_rows_bfd", &fastrm::plan_rows_bfd);
}
