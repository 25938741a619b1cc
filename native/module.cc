// module.cc — TorchScript modules across the C ABI.
#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/serialization/import.h>

#include <sys/stat.h>

#include <c10/util/accumulate.h>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <vector>

#include "internal.h"

namespace kiln {

// Appends every tensor in v (a tensor, or tuples/lists of them, nested) to
// out, in order. Anything else is an error naming what was found.
void flatten(const c10::IValue& v, std::vector<at::Tensor>* out) {
  if (v.isTensor()) {
    out->push_back(v.toTensor());
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) flatten(e, out);
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector()) out->push_back(t);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) flatten(e, out);
  } else {
    throw std::runtime_error("forward returned " + v.tagKind() +
                             "; Kiln accepts a tensor or a tuple/list of tensors");
  }
}

}  // namespace kiln

namespace {

// TorchScript wraps an operator's error in a traceback of the scripted
// source; callers want the operator's message, which is its last line.
std::string concise(const std::string& msg) {
  if (msg.find("The following operation failed in the TorchScript interpreter") ==
      std::string::npos) {
    return msg;
  }
  size_t end = msg.find_last_not_of("\n ");
  if (end == std::string::npos) return msg;
  size_t start = msg.rfind('\n', end);
  return msg.substr(start == std::string::npos ? 0 : start + 1, end - (start == std::string::npos ? 0 : start + 1) + 1);
}

const c10::FunctionSchema& forward_schema(kiln_module* m) {
  return m->m.get_method("forward").function().getSchema();
}

}  // namespace

extern "C" {

kiln_error kiln_module_load(const char* path, kiln_module** out) {
  KILN_CHECK_ARG(path != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  // A path that does not exist is NOT_FOUND; libtorch would say only that
  // opening it failed.
  struct stat st;
  if (stat(path, &st) != 0 && (errno == ENOENT || errno == ENOTDIR)) {
    return kiln::make_error(KILN_ERROR_NOT_FOUND,
                            std::string("no such file: ") + path);
  }
  torch::jit::Module m = torch::jit::load(std::string(path), torch::kCPU);
  m.eval();
  *out = new kiln_module{std::move(m)};
  // A file that is not a TorchScript archive is the caller's.
  KILN_GUARD_END_AS(KILN_ERROR_INVALID_ARGUMENT)
}

kiln_error kiln_module_load_bytes(const void* data, size_t n, kiln_module** out) {
  KILN_CHECK_ARG(out != nullptr, "out is NULL");
  KILN_CHECK_ARG(data != nullptr && n > 0, "empty model bytes");
  KILN_GUARD_BEGIN
  std::istringstream in(std::string(static_cast<const char*>(data), n));
  torch::jit::Module m = torch::jit::load(in, torch::kCPU);
  m.eval();
  *out = new kiln_module{std::move(m)};
  KILN_GUARD_END_AS(KILN_ERROR_INVALID_ARGUMENT)
}

void kiln_module_free(kiln_module* m) {
  try {
    delete m;
  } catch (...) {
  }
}

kiln_error kiln_module_save(kiln_module* m, const char* path) {
  KILN_CHECK_ARG(m != nullptr && path != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  m->m.save(std::string(path));
  KILN_GUARD_END
}

kiln_error kiln_module_set_train(kiln_module* m, int train) {
  KILN_CHECK_ARG(m != nullptr, "module is NULL");
  KILN_GUARD_BEGIN
  m->m.train(train != 0);
  KILN_GUARD_END
}

kiln_error kiln_module_optimize_for_inference(kiln_module* m) {
  KILN_CHECK_ARG(m != nullptr, "module is NULL");
  KILN_GUARD_BEGIN
  if (m->device.is_cuda()) {
    return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                            "optimize_for_inference: the module is on " + m->device.str() + ", not the CPU");
  }
  // Freezing clones the module: m->m is only replaced once every pass ran.
  torch::jit::Module eval = m->m.clone();
  eval.eval();
  torch::jit::Module frozen = torch::jit::freeze(eval);
  m->m = torch::jit::optimize_for_inference(frozen);
  KILN_GUARD_END
}

kiln_error kiln_module_forward(kiln_module* m, kiln_tensor* const* inputs, int n,
                               kiln_tensor*** outs, int* nouts) {
  KILN_CHECK_ARG(m != nullptr && outs != nullptr && nouts != nullptr, "NULL argument");
  KILN_CHECK_ARG(n >= 0 && (n == 0 || inputs != nullptr), "bad input array");
  for (int i = 0; i < n; i++) {
    KILN_CHECK_ARG(inputs[i] != nullptr, "input " + std::to_string(i) + " is NULL");
  }
  KILN_GUARD_BEGIN
  kiln::sync_threads();
  std::vector<at::Tensor> results;
  try {
    if (m->device.is_cuda()) {
      std::vector<at::Tensor> in;
      in.reserve(n);
      for (int i = 0; i < n; i++) in.push_back(inputs[i]->t);
      results = kiln::forward_on_device(m, in);
    } else {
      c10::InferenceMode guard;
      std::vector<c10::IValue> args;
      args.reserve(n);
      for (int i = 0; i < n; i++) args.emplace_back(inputs[i]->t);
      c10::IValue r = m->m.forward(std::move(args));
      kiln::flatten(r, &results);
    }
  } catch (...) {
    // The model rejecting the caller's tensors (shapes, dtypes, a raise in
    // its TorchScript) is the caller's error; libtorch's typed errors keep
    // their kind (out of memory, unsupported).
    return kiln::current_error(KILN_ERROR_INVALID_ARGUMENT, concise);
  }
  size_t count = results.size();
  auto** arr = static_cast<kiln_tensor**>(std::malloc(sizeof(kiln_tensor*) * (count ? count : 1)));
  if (arr == nullptr) return kiln::make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
  size_t made = 0;
  try {
    for (; made < count; made++) arr[made] = new kiln_tensor{std::move(results[made])};
  } catch (...) {
    for (size_t i = 0; i < made; i++) delete arr[i];
    std::free(arr);
    throw;
  }
  *outs = arr;
  *nouts = static_cast<int>(count);
  KILN_GUARD_END
}

namespace {

// One tensor of kiln_module_forward_into's descriptor.
struct blob_desc {
  at::ScalarType type;
  std::vector<int64_t> dims;
};

// Reads tensor i's description at desc[*pos], advancing *pos; false (with
// *why) when it is malformed.
bool read_blob_desc(const int64_t* desc, int desc_len, int* pos, blob_desc* out, std::string* why) {
  if (*pos + 2 > desc_len) {
    *why = "descriptor too short";
    return false;
  }
  int64_t code = desc[*pos], nd = desc[*pos + 1];
  if (code < 0 || code > 1000 || !kiln::to_scalar_type(static_cast<kiln_dtype>(code), &out->type)) {
    *why = "unknown dtype code " + std::to_string(code);
    return false;
  }
  if (nd < 0 || nd > KILN_FORWARD_INTO_MAX_DIMS || *pos + 2 + nd > desc_len) {
    *why = "bad dimension count " + std::to_string(nd);
    return false;
  }
  out->dims.assign(desc + *pos + 2, desc + *pos + 2 + nd);
  for (int64_t d : out->dims) {
    if (d < 0) {
      *why = "negative dimension";
      return false;
    }
  }
  *pos += 2 + static_cast<int>(nd);
  return true;
}

}  // namespace

kiln_error kiln_module_forward_into(kiln_module* m, const int64_t* desc, int desc_len, int n_in,
                                    const uintptr_t* in_data, int n_out, const uintptr_t* out_data,
                                    int* status) {
  KILN_CHECK_ARG(m != nullptr && desc != nullptr && status != nullptr, "NULL argument");
  KILN_CHECK_ARG(n_in >= 0 && n_out >= 0 && n_in <= 64 && n_out <= 64, "bad tensor counts");
  KILN_CHECK_ARG((n_in == 0 || in_data != nullptr) && (n_out == 0 || out_data != nullptr),
                 "bad data arrays");
  KILN_GUARD_BEGIN
  int pos = 0;
  std::string why;
  std::vector<blob_desc> ins(n_in), outs(n_out);
  for (int i = 0; i < n_in; i++) {
    if (!read_blob_desc(desc, desc_len, &pos, &ins[i], &why)) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "input " + std::to_string(i) + ": " + why);
    }
    if (in_data[i] == 0 && c10::multiply_integers(ins[i].dims) != 0) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "input " + std::to_string(i) + " is NULL");
    }
  }
  for (int i = 0; i < n_out; i++) {
    if (!read_blob_desc(desc, desc_len, &pos, &outs[i], &why)) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "output " + std::to_string(i) + ": " + why);
    }
  }
  kiln::sync_threads();
  std::vector<at::Tensor> in;
  in.reserve(n_in);
  // The inputs' byte ranges, to refuse outputs that alias them.
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (int i = 0; i < n_in; i++) {
    at::Tensor t = torch::from_blob(reinterpret_cast<void*>(in_data[i]), ins[i].dims, at::TensorOptions().dtype(ins[i].type));
    uintptr_t lo = in_data[i];
    spans.emplace_back(lo, lo + t.nbytes());
    in.push_back(std::move(t));
  }
  std::vector<at::Tensor> results;
  try {
    if (m->device.is_cuda()) {
      results = kiln::forward_on_device(m, in);
    } else {
      c10::InferenceMode guard;
      std::vector<c10::IValue> args(in.begin(), in.end());
      c10::IValue r = m->m.forward(std::move(args));
      kiln::flatten(r, &results);
    }
  } catch (...) {
    return kiln::current_error(KILN_ERROR_INVALID_ARGUMENT, concise);
  }
  *status = KILN_FORWARD_INTO_MISMATCH;
  if (static_cast<int>(results.size()) != n_out) return nullptr;
  for (int i = 0; i < n_out; i++) {
    const at::Tensor& r = results[i];
    if (r.scalar_type() != outs[i].type || r.sizes() != c10::IntArrayRef(outs[i].dims) ||
        !r.is_contiguous() || !r.device().is_cpu()) {
      return nullptr;
    }
    if (r.nbytes() == 0) continue;
    uintptr_t lo = reinterpret_cast<uintptr_t>(r.data_ptr()), hi = lo + r.nbytes();
    for (const auto& s : spans) {
      if (lo < s.second && s.first < hi) {
        *status = KILN_FORWARD_INTO_ALIASED;
        return nullptr;
      }
    }
  }
  for (int i = 0; i < n_out; i++) {
    if (results[i].nbytes() > 0) std::memcpy(reinterpret_cast<void*>(out_data[i]), results[i].data_ptr(), results[i].nbytes());
  }
  *status = KILN_FORWARD_INTO_DONE;
  KILN_GUARD_END
}

kiln_error kiln_module_schema(kiln_module* m, char** out) {
  KILN_CHECK_ARG(m != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  std::ostringstream s;
  s << forward_schema(m);
  *out = kiln::dup_string(s.str());
  if (*out == nullptr) return kiln::make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
  KILN_GUARD_END
}

kiln_error kiln_module_num_inputs(kiln_module* m, int* out) {
  KILN_CHECK_ARG(m != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  const auto& args = forward_schema(m).arguments();
  // The first argument is self.
  *out = args.empty() ? 0 : static_cast<int>(args.size()) - 1;
  KILN_GUARD_END
}

kiln_error kiln_module_input(kiln_module* m, int i, char** name, char** type) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr && type != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  const auto& args = forward_schema(m).arguments();
  int n = args.empty() ? 0 : static_cast<int>(args.size()) - 1;
  if (i < 0 || i >= n) {
    return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "input index " + std::to_string(i) + " out of range [0," +
                            std::to_string(n) + ")");
  }
  const auto& a = args[i + 1];
  char* nm = kiln::dup_string(a.name());
  char* ty = kiln::dup_string(a.type()->annotation_str());
  if (nm == nullptr || ty == nullptr) {
    std::free(nm);
    std::free(ty);
    return kiln::make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
  }
  *name = nm;
  *type = ty;
  KILN_GUARD_END
}

kiln_error kiln_module_output_type(kiln_module* m, char** type) {
  KILN_CHECK_ARG(m != nullptr && type != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  const auto& rets = forward_schema(m).returns();
  std::string s;
  if (rets.size() == 1) {
    s = rets[0].type()->annotation_str();
  } else {
    s = "(";
    for (size_t i = 0; i < rets.size(); i++) {
      if (i) s += ", ";
      s += rets[i].type()->annotation_str();
    }
    s += ")";
  }
  *type = kiln::dup_string(s);
  if (*type == nullptr) return kiln::make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
  KILN_GUARD_END
}

kiln_error kiln_module_param_stats(kiln_module* m, int64_t* count, int64_t* bytes) {
  KILN_CHECK_ARG(m != nullptr && count != nullptr && bytes != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  int64_t c = 0, b = 0;
  for (const at::Tensor& p : m->m.parameters(/*recurse=*/true)) {
    c += p.numel();
    b += static_cast<int64_t>(p.nbytes());
  }
  *count = c;
  *bytes = b;
  KILN_GUARD_END
}

}  // extern "C"
