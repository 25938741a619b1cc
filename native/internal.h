// internal.h — shared helpers for the C++ side of Kiln's C ABI. Not part of
// the ABI: only kiln.h is.
#ifndef KILN_NATIVE_INTERNAL_H
#define KILN_NATIVE_INTERNAL_H

#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "kiln.h"

struct kiln_tensor {
  at::Tensor t;
};

struct kiln_module {
  torch::jit::Module m;
};

namespace kiln {

// A malloc'd copy of msg, owned by the C caller.
inline char* dup_string(const std::string& msg) {
  char* s = static_cast<char*>(std::malloc(msg.size() + 1));
  if (s == nullptr) return nullptr;
  std::memcpy(s, msg.data(), msg.size());
  s[msg.size()] = '\0';
  return s;
}

// An error for the caller. Never returns NULL: if even the message cannot be
// allocated, a static-sized fallback is attempted.
inline kiln_error make_error(const std::string& msg) {
  char* s = dup_string(msg.empty() ? std::string("unknown error") : msg);
  if (s == nullptr) s = dup_string("out of memory");
  return s;
}

bool to_scalar_type(kiln_dtype d, at::ScalarType* out);

// Applies the thread count last set with kiln_set_num_threads to the
// calling OS thread. libtorch's OpenMP thread count is per OS thread, and
// Go runs cgo calls on whichever thread it likes, so every entry point
// that computes calls this first; it costs one comparison when in sync.
void sync_threads();
bool from_scalar_type(at::ScalarType s, kiln_dtype* out);

}  // namespace kiln

// KILN_GUARD wraps a function body so that no C++ exception crosses the C
// boundary: every exception becomes an error string the caller owns.
#define KILN_GUARD_BEGIN try {
#define KILN_GUARD_END                                                \
  }                                                                   \
  catch (const c10::Error& e) {                                       \
    return kiln::make_error(e.what_without_backtrace());              \
  }                                                                   \
  catch (const std::exception& e) {                                   \
    return kiln::make_error(e.what());                                \
  }                                                                   \
  catch (...) {                                                       \
    return kiln::make_error("unknown C++ exception");                 \
  }                                                                   \
  return nullptr;

#define KILN_CHECK_ARG(cond, msg) \
  do {                            \
    if (!(cond)) return kiln::make_error(msg); \
  } while (0)

#endif  // KILN_NATIVE_INTERNAL_H
