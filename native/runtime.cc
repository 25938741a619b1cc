// runtime.cc — library-wide entry points: errors, version, threads, seeds.
#include <ATen/Parallel.h>
#include <torch/version.h>

#include "internal.h"

#include <atomic>
#include <cstdlib>

#include <dlfcn.h>

namespace kiln {
namespace {
// The thread count set through the C ABI; 0 until set.
std::atomic<int> g_threads{0};
}  // namespace

// Sizes OpenBLAS's own thread pool, when libtorch's BLAS is OpenBLAS (as on
// Debian): at::set_num_threads bounds OpenMP but not OpenBLAS's pthreads,
// whose idle workers otherwise compete with libtorch's on small machines.
// An explicit OPENBLAS_NUM_THREADS wins.
void set_blas_threads(int n) {
  if (std::getenv("OPENBLAS_NUM_THREADS") != nullptr) return;
  using setter = void (*)(int);
  if (auto f = reinterpret_cast<setter>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) f(n);
}

void sync_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0 && at::get_num_threads() != n) at::set_num_threads(n);
}

}  // namespace kiln

extern "C" {

void kiln_error_free(kiln_error err) { std::free(err); }

void kiln_string_free(char* s) { std::free(s); }

const char* kiln_torch_version(void) { return TORCH_VERSION; }

kiln_error kiln_set_num_threads(int n) {
  KILN_CHECK_ARG(n >= 1, "thread count must be >= 1");
  KILN_GUARD_BEGIN
  at::set_num_threads(n);
  kiln::g_threads.store(n, std::memory_order_relaxed);
  kiln::set_blas_threads(n);
  KILN_GUARD_END
}

int kiln_get_num_threads(void) {
  try {
    int n = kiln::g_threads.load(std::memory_order_relaxed);
    if (n > 0) return n;
    return at::get_num_threads();
  } catch (...) {
    return -1;
  }
}

kiln_error kiln_set_num_interop_threads(int n) {
  KILN_CHECK_ARG(n >= 1, "inter-op thread count must be >= 1");
  KILN_GUARD_BEGIN
  at::set_num_interop_threads(n);
  KILN_GUARD_END
}

int kiln_get_num_interop_threads(void) {
  try {
    return at::get_num_interop_threads();
  } catch (...) {
    return -1;
  }
}

void kiln_manual_seed(uint64_t seed) {
  try {
    torch::manual_seed(seed);
  } catch (...) {
  }
}

int kiln_noop(int x) { return x + 1; }

}  // extern "C"
