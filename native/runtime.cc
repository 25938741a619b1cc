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

// The error make_error returns when it cannot allocate one; never freed.
char g_oom_message[] = "out of memory (allocating an error)";
kiln_error_s g_oom{KILN_ERROR_OUT_OF_MEMORY, g_oom_message};

// Whether msg is libtorch's CPU allocator failing. libtorch 1.13 raises a
// plain c10::Error for it ("DefaultCPUAllocator: can't allocate memory"),
// later versions "DefaultCPUAllocator: not enough memory"; TorchScript's
// interpreter rethrows either as std::runtime_error with the same text.
bool is_cpu_alloc_failure(const std::string& msg) {
  return msg.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos ||
         msg.find("DefaultCPUAllocator: not enough memory") != std::string::npos;
}

kiln_error classified(kiln_error_code_t code, std::string msg, message_fn fmt) {
  if (fmt != nullptr) msg = fmt(msg);
  return make_error(code, msg);
}
}  // namespace

kiln_error make_error(kiln_error_code_t code, const std::string& msg) noexcept {
  auto* e = static_cast<kiln_error_s*>(std::malloc(sizeof(kiln_error_s)));
  if (e == nullptr) return &g_oom;
  static const char kUnknown[] = "unknown error";
  const char* text = msg.empty() ? kUnknown : msg.c_str();
  size_t n = msg.empty() ? sizeof(kUnknown) - 1 : msg.size();
  e->message = static_cast<char*>(std::malloc(n + 1));
  if (e->message != nullptr) {
    std::memcpy(e->message, text, n);
    e->message[n] = '\0';
  } else {
    std::free(e);
    return &g_oom;
  }
  e->code = code;
  return e;
}

kiln_error current_error(kiln_error_code_t generic, message_fn fmt) noexcept {
  try {
    try {
      throw;
    } catch (const c10::OutOfMemoryError& e) {
      return classified(KILN_ERROR_OUT_OF_MEMORY, e.what_without_backtrace(), fmt);
    } catch (const c10::IndexError& e) {
      return classified(KILN_ERROR_INVALID_ARGUMENT, e.what_without_backtrace(), fmt);
    } catch (const c10::ValueError& e) {
      return classified(KILN_ERROR_INVALID_ARGUMENT, e.what_without_backtrace(), fmt);
    } catch (const c10::TypeError& e) {
      return classified(KILN_ERROR_INVALID_ARGUMENT, e.what_without_backtrace(), fmt);
    } catch (const c10::NotImplementedError& e) {
      return classified(KILN_ERROR_UNSUPPORTED, e.what_without_backtrace(), fmt);
    } catch (const c10::Error& e) {
      std::string msg = e.what_without_backtrace();
      return classified(is_cpu_alloc_failure(msg) ? KILN_ERROR_OUT_OF_MEMORY : generic, msg, fmt);
    } catch (const std::bad_alloc&) {
      return make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
      std::string msg = e.what();
      return classified(is_cpu_alloc_failure(msg) ? KILN_ERROR_OUT_OF_MEMORY : generic, msg, fmt);
    } catch (...) {
      return make_error(KILN_ERROR_INTERNAL, "unknown C++ exception");
    }
  } catch (...) {
    // Building the message failed (std::bad_alloc).
    return &g_oom;
  }
}

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

kiln_error_code_t kiln_error_code(kiln_error err) {
  return err == nullptr ? KILN_ERROR_UNKNOWN : err->code;
}

const char* kiln_error_message(kiln_error err) {
  return err == nullptr ? "" : err->message;
}

void kiln_error_free(kiln_error err) {
  if (err == nullptr || err == &kiln::g_oom) return;
  std::free(err->message);
  std::free(err);
}

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
