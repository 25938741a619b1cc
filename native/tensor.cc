// tensor.cc — tensors across the C ABI.
#include <atomic>
#include <memory>
#include <vector>

#include "internal.h"

namespace kiln {

std::atomic<int64_t> live_tensors{0};

bool to_scalar_type(kiln_dtype d, at::ScalarType* out) {
  switch (d) {
    case KILN_FLOAT32: *out = at::kFloat; return true;
    case KILN_FLOAT64: *out = at::kDouble; return true;
    case KILN_INT64: *out = at::kLong; return true;
    case KILN_INT32: *out = at::kInt; return true;
    case KILN_INT16: *out = at::kShort; return true;
    case KILN_INT8: *out = at::kChar; return true;
    case KILN_UINT8: *out = at::kByte; return true;
    case KILN_BOOL: *out = at::kBool; return true;
    case KILN_FLOAT16: *out = at::kHalf; return true;
    case KILN_BFLOAT16: *out = at::kBFloat16; return true;
  }
  return false;
}

bool from_scalar_type(at::ScalarType s, kiln_dtype* out) {
  switch (s) {
    case at::kFloat: *out = KILN_FLOAT32; return true;
    case at::kDouble: *out = KILN_FLOAT64; return true;
    case at::kLong: *out = KILN_INT64; return true;
    case at::kInt: *out = KILN_INT32; return true;
    case at::kShort: *out = KILN_INT16; return true;
    case at::kChar: *out = KILN_INT8; return true;
    case at::kByte: *out = KILN_UINT8; return true;
    case at::kBool: *out = KILN_BOOL; return true;
    case at::kHalf: *out = KILN_FLOAT16; return true;
    case at::kBFloat16: *out = KILN_BFLOAT16; return true;
    default: return false;
  }
}

namespace {

// Validates a shape and returns it with its element count.
kiln_error check_shape(const int64_t* shape, int ndim,
                       std::vector<int64_t>* dims, int64_t* numel) {
  if (ndim < 0) return make_error(KILN_ERROR_INVALID_ARGUMENT, "ndim must be >= 0, got " + std::to_string(ndim));
  if (ndim > 0 && shape == nullptr) return make_error(KILN_ERROR_INVALID_ARGUMENT, "shape is NULL but ndim > 0");
  dims->assign(shape, shape + ndim);
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) {
      return make_error(KILN_ERROR_INVALID_ARGUMENT, "dimension " + std::to_string(i) + " is negative (" +
                        std::to_string(shape[i]) + ")");
    }
    if (shape[i] != 0 && n > INT64_MAX / shape[i]) {
      return make_error(KILN_ERROR_INVALID_ARGUMENT, "shape overflows int64 element count");
    }
    n *= shape[i];
  }
  *numel = n;
  return nullptr;
}

}  // namespace
}  // namespace kiln

extern "C" {

kiln_error kiln_tensor_from_blob(void* data, kiln_dtype dtype,
                                 const int64_t* shape, int ndim,
                                 const int64_t* strides,
                                 kiln_release_fn release, void* ctx,
                                 kiln_tensor** out) {
  KILN_CHECK_ARG(out != nullptr, "out is NULL");
  at::ScalarType st;
  KILN_CHECK_ARG(kiln::to_scalar_type(dtype, &st),
                 "unknown dtype " + std::to_string(static_cast<int>(dtype)));
  std::vector<int64_t> dims;
  int64_t numel = 0;
  if (kiln_error e = kiln::check_shape(shape, ndim, &dims, &numel)) return e;
  KILN_CHECK_ARG(data != nullptr || numel == 0, "data is NULL for a non-empty tensor");
  std::vector<int64_t> strd;
  if (strides != nullptr) {
    strd.assign(strides, strides + ndim);
    for (int i = 0; i < ndim; i++) {
      KILN_CHECK_ARG(strd[i] >= 0, "stride " + std::to_string(i) + " is negative");
    }
  }
  KILN_GUARD_BEGIN
  // The deleter runs only once the tensor exists: if construction throws,
  // the caller keeps ownership of the buffer and release is never called.
  auto armed = std::make_shared<std::atomic<bool>>(false);
  auto deleter = [release, ctx, armed](void*) {
    if (release != nullptr && armed->exchange(false)) release(ctx);
  };
  auto opts = at::TensorOptions().dtype(st).device(at::kCPU);
  at::Tensor t = strides != nullptr
                     ? torch::from_blob(data, dims, strd, deleter, opts)
                     : torch::from_blob(data, dims, deleter, opts);
  auto* h = new kiln_tensor{std::move(t)};
  armed->store(true);
  *out = h;
  KILN_GUARD_END
}

kiln_error kiln_tensor_from_copy(const void* data, size_t nbytes,
                                 kiln_dtype dtype, const int64_t* shape,
                                 int ndim, kiln_tensor** out) {
  KILN_CHECK_ARG(out != nullptr, "out is NULL");
  at::ScalarType st;
  KILN_CHECK_ARG(kiln::to_scalar_type(dtype, &st),
                 "unknown dtype " + std::to_string(static_cast<int>(dtype)));
  std::vector<int64_t> dims;
  int64_t numel = 0;
  if (kiln_error e = kiln::check_shape(shape, ndim, &dims, &numel)) return e;
  size_t want = static_cast<size_t>(numel) * c10::elementSize(st);
  KILN_CHECK_ARG(nbytes == want, "buffer holds " + std::to_string(nbytes) +
                                     " bytes but shape and dtype need " +
                                     std::to_string(want));
  KILN_CHECK_ARG(data != nullptr || nbytes == 0, "data is NULL");
  KILN_GUARD_BEGIN
  at::Tensor t = at::empty(dims, at::TensorOptions().dtype(st).device(at::kCPU));
  if (nbytes > 0) std::memcpy(t.data_ptr(), data, nbytes);
  *out = new kiln_tensor{std::move(t)};
  KILN_GUARD_END
}

kiln_error kiln_tensor_zeros(kiln_dtype dtype, const int64_t* shape, int ndim,
                             kiln_tensor** out) {
  KILN_CHECK_ARG(out != nullptr, "out is NULL");
  at::ScalarType st;
  KILN_CHECK_ARG(kiln::to_scalar_type(dtype, &st),
                 "unknown dtype " + std::to_string(static_cast<int>(dtype)));
  std::vector<int64_t> dims;
  int64_t numel = 0;
  if (kiln_error e = kiln::check_shape(shape, ndim, &dims, &numel)) return e;
  KILN_GUARD_BEGIN
  *out = new kiln_tensor{at::zeros(dims, at::TensorOptions().dtype(st))};
  KILN_GUARD_END
}

void kiln_tensor_free(kiln_tensor* t) {
  try {
    delete t;
  } catch (...) {
  }
}

kiln_error kiln_tensor_dtype(const kiln_tensor* t, kiln_dtype* out) {
  KILN_CHECK_ARG(t != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  at::ScalarType st = t->t.scalar_type();
  if (!kiln::from_scalar_type(st, out)) {
    return kiln::make_error(KILN_ERROR_UNSUPPORTED, std::string("unsupported element type ") +
                            c10::toString(st));
  }
  KILN_GUARD_END
}

int kiln_tensor_ndim(const kiln_tensor* t) {
  return t == nullptr ? -1 : static_cast<int>(t->t.dim());
}

int kiln_tensor_shape(const kiln_tensor* t, int64_t* out, int cap) {
  if (t == nullptr) return -1;
  int n = static_cast<int>(t->t.dim());
  auto sizes = t->t.sizes();
  for (int i = 0; i < n && i < cap; i++) out[i] = sizes[i];
  return n;
}

int kiln_tensor_strides(const kiln_tensor* t, int64_t* out, int cap) {
  if (t == nullptr) return -1;
  int n = static_cast<int>(t->t.dim());
  auto strides = t->t.strides();
  for (int i = 0; i < n && i < cap; i++) out[i] = strides[i];
  return n;
}

int64_t kiln_tensor_numel(const kiln_tensor* t) {
  return t == nullptr ? -1 : t->t.numel();
}

int kiln_tensor_is_contiguous(const kiln_tensor* t) {
  return t != nullptr && t->t.is_contiguous() ? 1 : 0;
}

kiln_error kiln_tensor_data_ptr(const kiln_tensor* t, void** out) {
  KILN_CHECK_ARG(t != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  if (!t->t.device().is_cpu()) {
    return kiln::make_error(KILN_ERROR_FAILED_PRECONDITION, "tensor is on " + t->t.device().str() + ", not the CPU");
  }
  if (!t->t.is_contiguous()) {
    return kiln::make_error(KILN_ERROR_FAILED_PRECONDITION, "tensor is not contiguous; call contiguous first");
  }
  *out = t->t.data_ptr();
  KILN_GUARD_END
}

kiln_error kiln_tensor_contiguous(const kiln_tensor* t, kiln_tensor** out) {
  KILN_CHECK_ARG(t != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  *out = new kiln_tensor{t->t.contiguous()};
  KILN_GUARD_END
}

kiln_error kiln_tensor_to_dtype(const kiln_tensor* t, kiln_dtype dtype,
                                kiln_tensor** out) {
  KILN_CHECK_ARG(t != nullptr && out != nullptr, "NULL argument");
  at::ScalarType st;
  KILN_CHECK_ARG(kiln::to_scalar_type(dtype, &st),
                 "unknown dtype " + std::to_string(static_cast<int>(dtype)));
  KILN_GUARD_BEGIN
  *out = new kiln_tensor{t->t.to(st).contiguous()};
  KILN_GUARD_END
}

void kiln_tensor_array_free(kiln_tensor** arr) { std::free(arr); }

int64_t kiln_tensor_live_count(void) {
  return kiln::live_tensors.load(std::memory_order_relaxed);
}

}  // extern "C"
