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

// An int8 layer kind kiln_opt_add_packed_int8 packs: its name, the rank of
// its weight and its prepack operator.
struct PackedKind {
  std::string kind;
  int64_t dims;
  const char* prepack;
};

// The PackedKind for `kind` (linear, conv1d or conv2d) of layer `name`, or
// an error message in *err.
bool packed_kind(const std::string& kind, const std::string& name, PackedKind* out,
                 std::string* err) {
  if (kind == "linear") {
    *out = {kind, 2, "quantized::linear_prepack"};
  } else if (kind == "conv1d") {
    *out = {kind, 3, "quantized::conv1d_prepack"};
  } else if (kind == "conv2d") {
    *out = {kind, 4, "quantized::conv2d_prepack"};
  } else {
    *err = "int8 layer " + name + ": unknown kind \"" + kind +
           "\" (want linear, conv1d or conv2d)";
    return false;
  }
  return true;
}

// Checks the float weight w of layer `name` for pk, that a quantized engine
// is selected, and (for conv) the stride and padding; else an error
// message in *err.
bool check_packed_weight(const PackedKind& pk, const std::string& name, const at::Tensor& w,
                         int64_t stride, int64_t padding, std::string* err) {
  const std::string& k = pk.kind;
  if (w.dim() != pk.dims) {
    *err = "int8 " + k + " " + name + ": weight has shape " + shape_str(w.sizes()) + ", want " +
           std::to_string(pk.dims) + " dimensions";
    return false;
  }
  if (at::globalContext().qEngine() == at::QEngine::NoQEngine) {
    *err = "no quantized engine selected (this libtorch supports: " + supported_list() + ")";
    return false;
  }
  if (k != "linear" && (stride <= 0 || padding < 0)) {
    *err = "int8 " + k + " " + name + ": stride " + std::to_string(stride) + ", padding " +
           std::to_string(padding);
    return false;
  }
  return true;
}

// w quantized to qint8, symmetric (zero point 0, scale max|w|/127.5): one
// scale per output channel (dimension 0) or one for the whole tensor.
at::Tensor quantize_weight_int8(const at::Tensor& w, bool per_channel) {
  if (per_channel) {
    // max |w| over everything but the output channel.
    at::Tensor amax = w.abs().reshape({w.size(0), -1}).amax(1).to(at::kDouble);
    at::Tensor scales = at::where(amax > 0, amax / 127.5, at::ones_like(amax));
    at::Tensor zps = at::zeros({w.size(0)}, at::kLong);
    return at::quantize_per_channel(w, scales, zps, 0, at::kQInt8);
  }
  double amax = w.abs().max().item<double>();
  return at::quantize_per_tensor(w, amax > 0 ? amax / 127.5 : 1.0, 0, at::kQInt8);
}

// The float bias of layer `name` (none when bias is NULL) in *out, checked
// to have one value per output channel (out_channels); else an error
// message in *err.
bool packed_bias(const PackedKind& pk, const std::string& name, const kiln_tensor* bias,
                 int64_t out_channels, c10::optional<at::Tensor>* out, std::string* err) {
  if (bias == nullptr) return true;
  at::Tensor bt = bias->t.detach().to(at::kFloat).contiguous();
  if (bt.dim() != 1 || bt.size(0) != out_channels) {
    *err = "int8 " + pk.kind + " " + name + ": bias has shape " + shape_str(bt.sizes()) +
           ", want [" + std::to_string(out_channels) + "]";
    return false;
  }
  *out = bt;
  return true;
}

// Runs pk's prepack operator on the quantized weight q and bias b (for
// conv, with stride and padding in every spatial dimension, dilation 1
// and one group), putting the packed parameters in *out; else an error
// message in *err.
bool prepack(const PackedKind& pk, const at::Tensor& q, const c10::optional<at::Tensor>& b,
             int64_t stride, int64_t padding, c10::IValue* out, std::string* err) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(pk.prepack, "");
  torch::jit::Stack stack{c10::IValue(q), c10::IValue(b)};
  if (pk.kind != "linear") {
    const int64_t nd = pk.dims - 2;
    stack.emplace_back(std::vector<int64_t>(nd, stride));
    stack.emplace_back(std::vector<int64_t>(nd, padding));
    stack.emplace_back(std::vector<int64_t>(nd, 1));
    stack.emplace_back(int64_t{1});
  }
  op.callBoxed(&stack);
  if (stack.size() != 1) {
    *err = std::string(pk.prepack) + " returned " + std::to_string(stack.size()) +
           " values, want 1";
    return false;
  }
  c10::IValue packed = stack[0];
  if (!packed.isObject() && !packed.isCustomClass()) {
    *err = std::string(pk.prepack) + " returned a " + packed.tagKind();
    return false;
  }
  *out = packed;
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
  if (*out == nullptr) return kiln::make_error("out of memory");
  KILN_GUARD_END
}

kiln_error kiln_opt_qengine(char** out) {
  KILN_CHECK_ARG(out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  *out = kiln::dup_string(engine_name(at::globalContext().qEngine()));
  if (*out == nullptr) return kiln::make_error("out of memory");
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
  return kiln::make_error("quantized engine \"" + want +
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
  std::string err;
  PackedKind pk;
  if (!packed_kind(k, name, &pk, &err)) return kiln::make_error(err);
  at::Tensor w = weight->t.detach().to(at::kFloat).contiguous();
  if (!check_packed_weight(pk, name, w, stride, padding, &err)) return kiln::make_error(err);
  at::Tensor q = quantize_weight_int8(w, per_channel != 0);
  c10::optional<at::Tensor> b;
  if (!packed_bias(pk, name, bias, w.size(0), &b, &err)) return kiln::make_error(err);
  c10::IValue packed;
  if (!prepack(pk, q, b, stride, padding, &packed, &err)) return kiln::make_error(err);
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
