// Declares the `fastrm` op namespace. Every other source in kernels/ adds its ops with
// TORCH_LIBRARY_FRAGMENT(fastrm, m) and TORCH_LIBRARY_IMPL(fastrm, CPU, m), so each op lives
// in its own file and the build is one glob (CMakeLists.txt).
#include <torch/library.h>

namespace fastrm {
// Bumped when an op's schema changes; fastrm/_native.py refuses a stale build.
int64_t abi_version() { return 1; }
}  // namespace fastrm

TORCH_LIBRARY(fastrm, m) {
  m.def("abi_version() -> int", &fastrm::abi_version);
}
