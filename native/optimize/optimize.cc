// optimize.cc — module surgery for model optimization (pruning and
// quantization), behind the C ABI in kiln_optimize.h.
#include <ATen/Context.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/module.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>
#include <torch/script.h>

#include <string>
#include <vector>

#include "../internal.h"
#include "kiln_optimize.h"

namespace {

std::string engine_name(at::QEngine e) {
  switch (e) {
    case at::QEngine::NoQEngine:
      return "none";
    case at::QEngine::FBGEMM:
      return "fbgemm";
    case at::QEngine::QNNPACK:
      return "qnnpack";
    default:
      break;
  }
  // ONEDNN (and X86 in newer libtorch) have no stable enumerator across
  // versions; c10::toString names every engine.
  std::string s = c10::toString(e);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string supported_list() {
  std::string r;
  for (auto e : at::globalContext().supportedQEngines()) {
    if (e == at::QEngine::NoQEngine) continue;
    if (!r.empty()) r += ",";
    r += engine_name(e);
  }
  return r;
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); i++) {
    if (i) r += ", ";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

// The tensor attribute `name` of m, or an error message in *err.
bool tensor_attr(const torch::jit::Module& m, const std::string& name,
                 at::Tensor* out, std::string* err) {
  if (!m.hasattr(name)) {
    *err = "the module has no attribute " + name;
    return false;
  }
  c10::IValue v = m.attr(name);
  if (!v.isTensor()) {
    *err = "attribute " + name + " is a " + v.tagKind() + ", not a tensor";
    return false;
  }
  *out = v.toTensor();
  return true;
}

// Resolves `torch` to aten operators (as libtorch's native resolver does)
// and `quantized` to the quantized operators (quantized.linear_dynamic).
struct QuantizedResolver : torch::jit::Resolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(
      const std::string& name, torch::jit::GraphFunction& m,
      const torch::jit::SourceRange& loc) override {
    if (name == "torch") return std::make_shared<torch::jit::BuiltinModule>("aten");
    if (name == "quantized") return std::make_shared<torch::jit::BuiltinModule>("quantized");
    return nullptr;
  }
  c10::TypePtr resolveType(const std::string& name,
                           const torch::jit::SourceRange& loc) override {
    return nullptr;
  }
};

}  // namespace

extern "C" {

kiln_error kiln_opt_qengines(char** out) {
  KILN_CHECK_ARG(out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  *out = kiln::dup_string(supported_list());
  if (*out == nullptr) return kiln::make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
  KILN_GUARD_END
}

kiln_error kiln_opt_qengine(char** out) {
  KILN_CHECK_ARG(out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  *out = kiln::dup_string(engine_name(at::globalContext().qEngine()));
  if (*out == nullptr) return kiln::make_error(KILN_ERROR_OUT_OF_MEMORY, "out of memory");
  KILN_GUARD_END
}

kiln_error kiln_opt_set_qengine(const char* engine) {
  KILN_CHECK_ARG(engine != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  std::string want(engine);
  for (auto e : at::globalContext().supportedQEngines()) {
    if (e != at::QEngine::NoQEngine && engine_name(e) == want) {
      at::globalContext().setQEngine(e);
      return nullptr;
    }
  }
  return kiln::make_error(KILN_ERROR_UNSUPPORTED, "quantized engine \"" + want +
                          "\" is not supported by this libtorch (it supports: " +
                          supported_list() + ")");
  KILN_GUARD_END
}

kiln_error kiln_opt_get(kiln_module* m, const char* name, kiln_tensor** out) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  at::Tensor t;
  std::string err;
  if (!tensor_attr(m->m, name, &t, &err)) return kiln::make_error(err);
  *out = new kiln_tensor{t.detach().clone().contiguous()};
  KILN_GUARD_END
}

kiln_error kiln_opt_set(kiln_module* m, const char* name, const kiln_tensor* value) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr && value != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  at::Tensor t;
  std::string err;
  if (!tensor_attr(m->m, name, &t, &err)) return kiln::make_error(err);
  if (!t.sizes().equals(value->t.sizes())) {
    return kiln::make_error(std::string("cannot set ") + name + ": it has shape " +
                            shape_str(t.sizes()) + ", the value " +
                            shape_str(value->t.sizes()));
  }
  at::NoGradGuard ng;
  t.copy_(value->t);
  KILN_GUARD_END
}

kiln_error kiln_opt_add_linear_int8(kiln_module* m, const char* name,
                                    const kiln_tensor* weight,
                                    const kiln_tensor* bias, double* scale) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr && weight != nullptr && scale != nullptr,
                 "NULL argument");
  KILN_GUARD_BEGIN
  kiln::sync_threads();
  at::NoGradGuard ng;
  at::Tensor w = weight->t.detach().to(at::kFloat).contiguous();
  if (w.dim() != 2) {
    return kiln::make_error(std::string("int8 linear ") + name + ": weight has shape " +
                            shape_str(w.sizes()) + ", want [out, in]");
  }
  if (at::globalContext().qEngine() == at::QEngine::NoQEngine) {
    return kiln::make_error("no quantized engine selected (this libtorch supports: " +
                            supported_list() + ")");
  }
  double amax = w.abs().max().item<double>();
  double s = amax > 0 ? amax / 127.5 : 1.0;
  at::Tensor q = at::quantize_per_tensor(w, s, 0, at::kQInt8);
  c10::optional<at::Tensor> b;
  if (bias != nullptr) {
    at::Tensor bt = bias->t.detach().to(at::kFloat).contiguous();
    if (bt.dim() != 1 || bt.size(0) != w.size(0)) {
      return kiln::make_error(std::string("int8 linear ") + name + ": bias has shape " +
                              shape_str(bt.sizes()) + ", want [" +
                              std::to_string(w.size(0)) + "]");
    }
    b = bt;
  }
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
      "quantized::linear_prepack", "");
  torch::jit::Stack stack{c10::IValue(q), c10::IValue(b)};
  op.callBoxed(&stack);
  if (stack.size() != 1) {
    return kiln::make_error("quantized::linear_prepack returned " +
                            std::to_string(stack.size()) + " values, want 1");
  }
  c10::IValue packed = stack[0];
  if (!packed.isObject() && !packed.isCustomClass()) {
    return kiln::make_error("quantized::linear_prepack returned a " + packed.tagKind());
  }
  m->m.register_attribute(name, packed.type(), packed);
  *scale = s;
  KILN_GUARD_END
}

kiln_error kiln_opt_add_packed_int8(kiln_module* m, const char* name,
                                    const char* kind,
                                    const kiln_tensor* weight,
                                    const kiln_tensor* bias, int per_channel,
                                    int64_t stride, int64_t padding,
                                    int64_t* weight_bytes) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr && kind != nullptr && weight != nullptr &&
                     weight_bytes != nullptr,
                 "NULL argument");
  KILN_GUARD_BEGIN
  kiln::sync_threads();
  at::NoGradGuard ng;
  const std::string k(kind);
  int64_t want_dim;
  const char* prepack;
  if (k == "linear") {
    want_dim = 2;
    prepack = "quantized::linear_prepack";
  } else if (k == "conv1d") {
    want_dim = 3;
    prepack = "quantized::conv1d_prepack";
  } else if (k == "conv2d") {
    want_dim = 4;
    prepack = "quantized::conv2d_prepack";
  } else {
    return kiln::make_error("int8 layer " + std::string(name) + ": unknown kind \"" + k +
                            "\" (want linear, conv1d or conv2d)");
  }
  at::Tensor w = weight->t.detach().to(at::kFloat).contiguous();
  if (w.dim() != want_dim) {
    return kiln::make_error("int8 " + k + " " + name + ": weight has shape " +
                            shape_str(w.sizes()) + ", want " + std::to_string(want_dim) +
                            " dimensions");
  }
  if (at::globalContext().qEngine() == at::QEngine::NoQEngine) {
    return kiln::make_error("no quantized engine selected (this libtorch supports: " +
                            supported_list() + ")");
  }
  if (k != "linear" && (stride <= 0 || padding < 0)) {
    return kiln::make_error("int8 " + k + " " + name + ": stride " + std::to_string(stride) +
                            ", padding " + std::to_string(padding));
  }
  at::Tensor q;
  if (per_channel) {
    // max |w| over everything but the output channel.
    at::Tensor amax = w.abs().reshape({w.size(0), -1}).amax(1).to(at::kDouble);
    at::Tensor scales = at::where(amax > 0, amax / 127.5, at::ones_like(amax));
    at::Tensor zps = at::zeros({w.size(0)}, at::kLong);
    q = at::quantize_per_channel(w, scales, zps, 0, at::kQInt8);
  } else {
    double amax = w.abs().max().item<double>();
    q = at::quantize_per_tensor(w, amax > 0 ? amax / 127.5 : 1.0, 0, at::kQInt8);
  }
  c10::optional<at::Tensor> b;
  if (bias != nullptr) {
    at::Tensor bt = bias->t.detach().to(at::kFloat).contiguous();
    if (bt.dim() != 1 || bt.size(0) != w.size(0)) {
      return kiln::make_error("int8 " + k + " " + name + ": bias has shape " +
                              shape_str(bt.sizes()) + ", want [" + std::to_string(w.size(0)) +
                              "]");
    }
    b = bt;
  }
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(prepack, "");
  torch::jit::Stack stack{c10::IValue(q), c10::IValue(b)};
  if (k != "linear") {
    const int64_t nd = want_dim - 2;
    stack.emplace_back(std::vector<int64_t>(nd, stride));
    stack.emplace_back(std::vector<int64_t>(nd, padding));
    stack.emplace_back(std::vector<int64_t>(nd, 1));
    stack.emplace_back(int64_t{1});
  }
  op.callBoxed(&stack);
  if (stack.size() != 1) {
    return kiln::make_error(std::string(prepack) + " returned " + std::to_string(stack.size()) +
                            " values, want 1");
  }
  c10::IValue packed = stack[0];
  if (!packed.isObject() && !packed.isCustomClass()) {
    return kiln::make_error(std::string(prepack) + " returned a " + packed.tagKind());
  }
  m->m.register_attribute(name, packed.type(), packed);
  *weight_bytes = w.numel();
  KILN_GUARD_END
}

kiln_error kiln_opt_define(kiln_module* m, const char* source) {
  KILN_CHECK_ARG(m != nullptr && source != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  m->m.define(source, std::make_shared<QuantizedResolver>());
  KILN_GUARD_END
}

}  // extern "C"
