// internal.h — shared helpers for the C++ side of Kiln's C ABI. Not part of
// the ABI: only kiln.h is.
#ifndef KILN_NATIVE_INTERNAL_H
#define KILN_NATIVE_INTERNAL_H

#include <torch/script.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "kiln.h"

// The struct behind kiln_error.
struct kiln_error_s {
  kiln_error_code_t code;
  char* message;  // malloc'd
};

namespace kiln {
// The number of kiln_tensor handles alive now (kiln_tensor_live_count).
extern std::atomic<int64_t> live_tensors;
}  // namespace kiln

// A tensor handle: one reference to a libtorch tensor, owned by whoever
// received it across the C ABI. Every handle counts itself in
// kiln::live_tensors from construction to destruction, so handles made by
// any entry point (tensor.cc, module.cc, trainer, optimize) are counted.
struct kiln_tensor {
  at::Tensor t;

  explicit kiln_tensor(at::Tensor v) noexcept : t(std::move(v)) {
    kiln::live_tensors.fetch_add(1, std::memory_order_relaxed);
  }
  ~kiln_tensor() { kiln::live_tensors.fetch_sub(1, std::memory_order_relaxed); }
  kiln_tensor(const kiln_tensor&) = delete;
  kiln_tensor& operator=(const kiln_tensor&) = delete;
};

// A module and the device its parameters live on (kiln_module_to). With
// KILN_WITH_CUDA (scripts/env.sh defines it for a libtorch with CUDA), a
// module on a GPU runs its forward on a CUDA stream of its own.
struct kiln_module {
  torch::jit::Module m;
  c10::Device device{c10::kCPU};
#ifdef KILN_WITH_CUDA
  std::shared_ptr<void> stream;  // a c10::cuda::CUDAStream, see device.cc
#endif
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

// An error for the caller with a code and a copy of msg. Never returns
// NULL: if the allocation fails, a static out-of-memory error is returned
// (kiln_error_free knows not to free it). Never throws.
kiln_error make_error(kiln_error_code_t code, const std::string& msg) noexcept;

// An error from a check Kiln makes that has no more specific kind: the
// caller passed nothing wrong that Kiln can name, so it is INTERNAL.
inline kiln_error make_error(const std::string& msg) noexcept {
  return make_error(KILN_ERROR_INTERNAL, msg);
}

// A message transform applied to libtorch's message (e.g. concise).
using message_fn = std::string (*)(const std::string&);

// The error for the exception being handled; call it only inside a catch
// block. libtorch's typed errors keep their kind whatever `generic` says:
//   c10::OutOfMemoryError, std::bad_alloc, and libtorch's CPU allocator
//     failing (a plain c10::Error in libtorch 1.13)     -> OUT_OF_MEMORY
//   c10::IndexError, c10::ValueError, c10::TypeError     -> INVALID_ARGUMENT
//   c10::NotImplementedError                             -> UNSUPPORTED
// Any other exception gets `generic`: INVALID_ARGUMENT where the failure is
// the caller's input (forward on the caller's tensors, loading the caller's
// file), INTERNAL elsewhere. fmt, when not NULL, rewrites the message.
// Never throws.
kiln_error current_error(kiln_error_code_t generic, message_fn fmt = nullptr) noexcept;

bool to_scalar_type(kiln_dtype d, at::ScalarType* out);

// Runs forward on a module placed on a GPU (kiln_module_to): inputs
// copied host→device through pinned memory on the module's stream,
// outputs flattened and copied back to the CPU. Throws like forward.
// Defined in device.cc.
std::vector<at::Tensor> forward_on_device(kiln_module* m, const std::vector<at::Tensor>& inputs);

// Appends every tensor in v (a tensor, or tuples/lists of them, nested)
// to out, in order; anything else throws. Defined in module.cc.
void flatten(const c10::IValue& v, std::vector<at::Tensor>* out);

// Applies the thread count last set with kiln_set_num_threads to the
// calling OS thread. libtorch's OpenMP thread count is per OS thread, and
// Go runs cgo calls on whichever thread it likes, so every entry point
// that computes calls this first; it costs one comparison when in sync.
void sync_threads();
bool from_scalar_type(at::ScalarType s, kiln_dtype* out);

}  // namespace kiln

// KILN_GUARD wraps a function body so that no C++ exception crosses the C
// boundary: every exception becomes an error the caller owns, classified by
// kiln::current_error with INTERNAL for unclassified ones.
// KILN_GUARD_END_AS(code) does the same with `code` for unclassified ones.
#define KILN_GUARD_BEGIN try {
#define KILN_GUARD_END_AS(generic)          \
  }                                         \
  catch (...) {                             \
    return kiln::current_error(generic);    \
  }                                         \
  return nullptr;
#define KILN_GUARD_END KILN_GUARD_END_AS(KILN_ERROR_INTERNAL)

// KILN_CHECK_ARG returns an INVALID_ARGUMENT error with msg unless cond.
#define KILN_CHECK_ARG(cond, msg)                                        \
  do {                                                                   \
    if (!(cond)) return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, msg); \
  } while (0)

#endif  // KILN_NATIVE_INTERNAL_H
