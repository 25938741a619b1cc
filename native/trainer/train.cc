// train.cc — building TorchScript networks and training them with autograd
// and torch::optim, behind the C ABI in kiln_train.h.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/version.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cerrno>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <type_traits>
#include <utility>
#ifdef __GLIBC__
#include <malloc.h>
#include <sys/stat.h>
#endif
#include <string>
#include <vector>

#include "../internal.h"
#include "kiln_train.h"

#include "trainer_internal.h"

namespace {

// TorchScript wraps an operator's error in a traceback of the scripted
// source; the operator's message is its last line.
std::string concise(const std::string& msg) {
  if (msg.find("The following operation failed in the TorchScript interpreter") ==
      std::string::npos) {
    return msg;
  }
  size_t end = msg.find_last_not_of("\n ");
  if (end == std::string::npos) return msg;
  size_t start = msg.rfind('\n', end);
  start = start == std::string::npos ? 0 : start + 1;
  return msg.substr(start, end - start + 1);
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); i++) {
    if (i) r += ", ";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

// The target shaped like the output for element-wise losses.
at::Tensor match_target(const at::Tensor& out, const at::Tensor& y) {
  if (y.numel() != out.numel()) {
    throw std::runtime_error("target has shape " + shape_str(y.sizes()) +
                             " but the model outputs " + shape_str(out.sizes()));
  }
  at::Tensor t = y.scalar_type() == out.scalar_type() ? y : y.to(out.scalar_type());
  return t.sizes() == out.sizes() ? t : t.reshape(out.sizes());
}

// Fails unless every class index in target (int64) is in [0, k).
void check_classes(const at::Tensor& target, int64_t k) {
  if (target.numel() == 0) return;
  int64_t lo = target.min().item<int64_t>(), hi = target.max().item<int64_t>();
  if (lo < 0 || hi >= k) {
    throw std::runtime_error("cross-entropy: class index " + std::to_string(lo < 0 ? lo : hi) +
                             " outside [0, " + std::to_string(k) + ") for a model with " +
                             std::to_string(k) + " outputs");
  }
}

// The mean loss of out against y. check validates class indices
// (cross-entropy); an epoch checks all its targets once instead.
at::Tensor compute_loss(const kiln_trainer* t, const at::Tensor& out,
                        const at::Tensor& y, bool check = true) {
  const int64_t mean = at::Reduction::Mean;
  switch (t->loss) {
    case KILN_LOSS_MSE:
      return at::mse_loss(out, match_target(out, y), mean);
    case KILN_LOSS_L1:
      return at::l1_loss(out, match_target(out, y), mean);
    case KILN_LOSS_HUBER:
      return at::huber_loss(out, match_target(out, y), mean, t->huber_delta);
    case KILN_LOSS_BCE_LOGITS:
      return at::binary_cross_entropy_with_logits(out, match_target(out, y), {}, {}, mean);
    case KILN_LOSS_CROSS_ENTROPY: {
      if (out.dim() != 2) {
        throw std::runtime_error("cross-entropy needs outputs [batch, classes], got " +
                                 shape_str(out.sizes()));
      }
      at::Tensor target = y.reshape({-1});
      if (target.size(0) != out.size(0)) {
        throw std::runtime_error("cross-entropy: " + std::to_string(target.size(0)) +
                                 " targets for " + std::to_string(out.size(0)) + " outputs");
      }
      if (target.scalar_type() != at::kLong) target = target.to(at::kLong);
      int64_t k = out.size(1);
      if (check) check_classes(target, k);
      c10::optional<at::Tensor> w;
      if (t->class_weights.defined()) {
        if (t->class_weights.numel() != k) {
          throw std::runtime_error("cross-entropy: " + std::to_string(t->class_weights.numel()) +
                                   " class weights for " + std::to_string(k) + " classes");
        }
        w = t->class_weights.to(out.device(), out.scalar_type());
      }
      return at::cross_entropy_loss(out, target, w, mean, -100, t->label_smoothing);
    }
  }
  throw std::runtime_error("unknown loss " + std::to_string(static_cast<int>(t->loss)));
}

// Whether TorchScript's graph optimizations (profiling, autodiff
// subgraphs) run on Kiln's networks. Off by default: for training, where
// every op records autograd anyway, the unoptimized plan runs ops exactly
// as eager PyTorch does and measured faster. KILN_JIT_OPTIMIZE=1 turns
// them on.
bool jit_optimize() {
  static const bool on = [] {
    const char* v = std::getenv("KILN_JIT_OPTIMIZE");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

// Autocast of forward and loss to t->amp on t's device while it lives, as
// `with torch.autocast(device_type, dtype):` does; the previous state is
// restored and the cast cache cleared when the outermost scope ends.
class AutocastScope {
 public:
  explicit AutocastScope(const kiln_trainer* t) : type_(t->device.type()), on_(t->amp != at::ScalarType::Undefined) {
    if (!on_) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    was_on_ = at::autocast::is_autocast_enabled(type_);
    was_dtype_ = at::autocast::get_autocast_dtype(type_);
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, t->amp);
#else
    if (type_ == c10::DeviceType::CPU) {
      was_on_ = at::autocast::is_cpu_enabled();
      was_dtype_ = at::autocast::get_autocast_cpu_dtype();
      at::autocast::set_cpu_enabled(true);
      at::autocast::set_autocast_cpu_dtype(t->amp);
    } else {
      was_on_ = at::autocast::is_enabled();
      was_dtype_ = at::autocast::get_autocast_gpu_dtype();
      at::autocast::set_enabled(true);
      at::autocast::set_autocast_gpu_dtype(t->amp);
    }
#endif
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
    at::autocast::set_autocast_enabled(type_, was_on_);
    at::autocast::set_autocast_dtype(type_, was_dtype_);
#else
    if (type_ == c10::DeviceType::CPU) {
      at::autocast::set_cpu_enabled(was_on_);
      at::autocast::set_autocast_cpu_dtype(was_dtype_);
    } else {
      at::autocast::set_enabled(was_on_);
      at::autocast::set_autocast_gpu_dtype(was_dtype_);
    }
#endif
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool on_;
  bool was_on_ = false;
  at::ScalarType was_dtype_ = at::ScalarType::Undefined;
};

// x on the trainer's device (the same tensor when it is there already).
at::Tensor on_device(const kiln_trainer* t, const at::Tensor& x) {
  return x.device() == t->device ? x : x.to(t->device);
}

at::Tensor run_forward(kiln_trainer* t, const at::Tensor& x, bool training = false) {
  torch::jit::GraphOptimizerEnabledGuard opt(jit_optimize());
  torch::jit::Module& m = training && t->train_m ? *t->train_m : t->m;
  c10::IValue r = m.forward({x});
  if (!r.isTensor()) throw std::runtime_error("forward returned " + r.tagKind() + ", not a tensor");
  return r.toTensor();
}

// Scales gradients so that their joint 2-norm is at most max_norm, as
// torch.nn.utils.clip_grad_norm_ does.
void clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  at::NoGradGuard ng;
  std::vector<at::Tensor> norms;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) norms.push_back(p.grad().norm(2));
  }
  if (norms.empty()) return;
  double total = at::stack(norms).norm(2).item<double>();
  double coef = max_norm / (total + 1e-6);
  if (coef < 1) {
    for (const at::Tensor& p : params) {
      if (p.grad().defined()) p.grad().mul_(coef);
    }
  }
}

// Drops every gradient (PyTorch's zero_grad(set_to_none=True)): backward
// then stores fresh gradients instead of adding to zeroed ones, two
// kernels fewer per parameter and step, with identical values.
void clear_grads(kiln_trainer* t) {
  for (at::Tensor& p : t->params) p.mutable_grad().reset();
}

// torch::optim::SGD::step with the same arithmetic and the same state
// (so save/load are torch's), minus its per-parameter overhead: it formats
// each parameter's state key twice per step and wraps tensors in .data().
// For small networks that overhead is a sizeable part of a step.
void sgd_step(kiln_trainer* t) {
  at::NoGradGuard ng;
  auto& o = static_cast<torch::optim::SGDOptions&>(t->opt->param_groups()[0].options());
  const double lr = o.lr(), m = o.momentum(), wd = o.weight_decay(), damp = o.dampening();
  auto& state = t->opt->state();
  for (size_t i = 0; i < t->params.size(); i++) {
    at::Tensor& p = t->params[i];
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    at::Tensor d = wd != 0 ? g.add(p, wd) : g;
    if (m != 0) {
      auto it = state.find(t->keys[i]);
      at::Tensor buf;
      if (it == state.end()) {
        buf = d.clone().detach();
        auto st = std::make_unique<torch::optim::SGDParamState>();
        st->momentum_buffer(buf);
        state[t->keys[i]] = std::move(st);
      } else {
        buf = static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
        buf.mul_(m).add_(d, 1 - damp);
      }
      d = o.nesterov() ? d.add(buf, m) : buf;
    }
    p.add_(d, -lr);
  }
}

// One optimization step. check: see compute_loss. all_y, when defined,
// holds every target of the epoch, checked against the first output.
double train_step(kiln_trainer* t, const at::Tensor& x, const at::Tensor& y,
                  bool check = true, const at::Tensor& all_y = at::Tensor()) {
  clear_grads(t);
  at::Tensor l;
  {
    AutocastScope amp(t);
    at::Tensor out = run_forward(t, on_device(t, x), /*training=*/true);
    if (all_y.defined() && t->loss == KILN_LOSS_CROSS_ENTROPY && out.dim() == 2) {
      check_classes(all_y, out.size(1));
    }
    // Under autocast the losses run in float32 (autocast's fp32 list),
    // as torch.autocast does.
    l = compute_loss(t, out, on_device(t, y), check);
  }
  if (t->before_backward) t->before_backward(t);
  l.backward();
  if (t->reduce_grads) t->reduce_grads(t);
  if (t->clip > 0) clip_grad_norm(t->params, t->clip);
  if (t->sgd) {
    sgd_step(t);
  } else {
    t->opt->step();
  }
  return l.item<double>();
}

void set_lr(kiln_trainer* t, double lr) {
  auto& groups = t->opt->param_groups();
  for (size_t i = 0; i < groups.size(); i++) {
    groups[i].options().set_lr(i < t->lr_scale.size() ? lr * t->lr_scale[i] : lr);
  }
}

// Channels-last (NHWC) memory for a CPU epoch of a network with 4-D
// (convolution) weights and image batches: oneDNN's convolutions then read
// and write the tensors as they are, with no reorder to and from its own
// layout at every call, and pooling, batch norm and ReLU run their
// vectorized channels-last kernels. The values are the same (only the
// order in memory changes); the parameters go back to the standard
// contiguous layout when the epoch ends, so that evaluation, checkpoints
// and the saved model never see the difference. kiln_train_options'
// contiguous_format turns it off.
class ChannelsLastScope {
 public:
  ChannelsLastScope(kiln_trainer* t, at::Tensor* x) {
    if (!t->channels_last || !t->device.is_cpu() || t->amp != at::ScalarType::Undefined) return;
    for (at::Tensor& p : t->params) {
      if (p.dim() == 4) params_.push_back(p);
    }
    if (params_.empty()) return;
    at::NoGradGuard ng;
    for (at::Tensor& p : params_) p.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
    // A network that takes images as they are gets its batches in the
    // same layout (one that reshapes flat rows gets channels-last tensors
    // from its first convolution on).
    if (x->dim() == 4) *x = x->contiguous(at::MemoryFormat::ChannelsLast);
  }
  ~ChannelsLastScope() {
    try {
      at::NoGradGuard ng;
      for (at::Tensor& p : params_) {
        p.set_data(p.contiguous());
        if (p.grad().defined()) p.mutable_grad() = p.grad().contiguous();
      }
    } catch (...) {
      // Out of memory: the parameters keep the channels-last layout, which
      // holds the same values; nothing may escape a destructor.
    }
  }
  ChannelsLastScope(const ChannelsLastScope&) = delete;
  ChannelsLastScope& operator=(const ChannelsLastScope&) = delete;

 private:
  std::vector<at::Tensor> params_;
};

// Batch boundaries: starts[i]..starts[i+1].
std::vector<int64_t> batch_starts(int64_t n, int64_t batch) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < n; i += batch) s.push_back(i);
  if (s.size() >= 2 && n - s.back() == 1) s.pop_back();
  s.push_back(n);
  return s;
}

// Training allocates and frees the same activation and gradient buffers
// every step. With glibc's defaults, buffers above the (dynamic) mmap
// threshold are mapped and unmapped each time and freed heap tops are
// trimmed, so every step pays page faults and page zeroing: measured up to
// half the time of a small CNN step. Once per process, before the first
// trainer, Kiln raises the mmap threshold to 64 MiB and the trim threshold
// to 128 MiB (KILN_MALLOC_TUNE=0 leaves glibc's defaults). The cost is
// memory kept mapped for reuse instead of returned to the system.
void tune_malloc() {
#ifdef __GLIBC__
  static std::once_flag once;
  std::call_once(once, [] {
    const char* v = std::getenv("KILN_MALLOC_TUNE");
    if (v != nullptr && v[0] == '0') return;
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 128 << 20);
  });
#endif
}

at::Generator generator(uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return g;
}

}  // namespace

namespace kiln {

void tune_malloc_once() { tune_malloc(); }

std::unique_ptr<torch::optim::Optimizer> make_optimizer(
    const kiln_train_options& o, const std::vector<std::vector<at::Tensor>>& groups,
    const std::vector<double>& lrs) {
  double eps = o.eps > 0 ? o.eps : 1e-8;
  double b1 = o.beta1 > 0 ? o.beta1 : 0.9, b2 = o.beta2 > 0 ? o.beta2 : 0.999;
  // One options object per group (each group's own learning rate).
  auto build = [&](auto defaults) {
    using Options = decltype(defaults);
    std::vector<torch::optim::OptimizerParamGroup> pg;
    for (size_t i = 0; i < groups.size(); i++) {
      auto gopt = std::make_unique<Options>(defaults);
      gopt->lr(lrs[i]);
      pg.emplace_back(groups[i], std::move(gopt));
    }
    return pg;
  };
  switch (o.optimizer) {
    case KILN_OPTIMIZER_SGD: {
      auto d = torch::optim::SGDOptions(o.lr)
                   .momentum(o.momentum)
                   .nesterov(o.nesterov != 0)
                   .weight_decay(o.weight_decay);
      return std::make_unique<torch::optim::SGD>(build(d), d);
    }
    case KILN_OPTIMIZER_ADAM: {
      auto d = torch::optim::AdamOptions(o.lr).betas({b1, b2}).eps(eps).weight_decay(o.weight_decay);
      return std::make_unique<torch::optim::Adam>(build(d), d);
    }
    case KILN_OPTIMIZER_ADAMW: {
      auto d = torch::optim::AdamWOptions(o.lr).betas({b1, b2}).eps(eps).weight_decay(o.weight_decay);
      return std::make_unique<torch::optim::AdamW>(build(d), d);
    }
    case KILN_OPTIMIZER_RMSPROP: {
      auto d = torch::optim::RMSpropOptions(o.lr)
                   .alpha(o.alpha > 0 ? o.alpha : 0.99)
                   .eps(eps)
                   .weight_decay(o.weight_decay)
                   .momentum(o.momentum);
      return std::make_unique<torch::optim::RMSprop>(build(d), d);
    }
  }
  throw std::invalid_argument("unknown optimizer " + std::to_string(static_cast<int>(o.optimizer)));
}

}  // namespace kiln

namespace kiln {
kiln_error set_amp(kiln_trainer* t, kiln_amp amp) {
  switch (amp) {
    case KILN_AMP_NONE:
      t->amp = at::ScalarType::Undefined;
      return nullptr;
    case KILN_AMP_BF16:
      t->amp = at::kBFloat16;
      return nullptr;
    case KILN_AMP_FP16:
      if (!t->device.is_cuda()) {
        return make_error(KILN_ERROR_UNSUPPORTED, "mixed precision fp16 needs a CUDA device (the module is on " +
                                                      t->device.str() + "); use bf16 on the CPU");
      }
      t->amp = at::kHalf;
      return nullptr;
  }
  return make_error(KILN_ERROR_INVALID_ARGUMENT,
                    "unknown mixed precision mode " + std::to_string(static_cast<int>(amp)));
}
}  // namespace kiln

extern "C" {

kiln_error kiln_nn_new(const char* class_name, kiln_module** out) {
  KILN_CHECK_ARG(class_name != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  torch::jit::Module m{c10::QualifiedName(class_name)};
  m.register_attribute("training", c10::BoolType::get(), true);
  *out = new kiln_module{std::move(m)};
  KILN_GUARD_END
}

namespace {

// A new tensor of dtype and shape filled by init from a generator seeded
// with seed; errors for an unknown init. Throws only through torch calls,
// so callers run it inside KILN_GUARD.
kiln_error init_tensor(at::ScalarType st, const int64_t* shape, int ndim,
                       kiln_init init, double a, double b, uint64_t seed,
                       at::Tensor* out) {
  std::vector<int64_t> dims(shape, shape + ndim);
  at::Tensor t = at::empty(dims, at::TensorOptions().dtype(st));
  at::Generator g = generator(seed);
  at::NoGradGuard ng;
  switch (init) {
    case KILN_INIT_ZEROS: t.zero_(); break;
    case KILN_INIT_ONES: t.fill_(1); break;
    case KILN_INIT_UNIFORM: t.uniform_(a, b, g); break;
    case KILN_INIT_NORMAL: t.normal_(a, b, g); break;
    default:
      return kiln::make_error("unknown init " + std::to_string(static_cast<int>(init)));
  }
  *out = std::move(t);
  return nullptr;
}

void register_parameter(kiln_module* m, const char* name, at::Tensor t) {
  t.set_requires_grad(true);
  m->m.register_parameter(name, t, /*is_buffer=*/false);
}

void register_buffer(kiln_module* m, const char* name, at::Tensor t) {
  m->m.register_buffer(name, t);
}

}  // namespace

kiln_error kiln_nn_register_parameter(kiln_module* m, const char* name,
                                      const kiln_tensor* value) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr && value != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  register_parameter(m, name, value->t.detach().clone().contiguous());
  KILN_GUARD_END
}

kiln_error kiln_nn_register_buffer(kiln_module* m, const char* name,
                                   const kiln_tensor* value) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr && value != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  register_buffer(m, name, value->t.detach().clone().contiguous());
  KILN_GUARD_END
}

kiln_error kiln_nn_register_parameter_init(kiln_module* m, const char* name,
                                           kiln_dtype dtype, const int64_t* shape,
                                           int ndim, kiln_init init, double a,
                                           double b, uint64_t seed) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr, "NULL argument");
  KILN_CHECK_ARG(ndim >= 0 && (ndim == 0 || shape != nullptr), "bad shape");
  at::ScalarType st;
  KILN_CHECK_ARG(kiln::to_scalar_type(dtype, &st),
                 "unknown dtype " + std::to_string(static_cast<int>(dtype)));
  KILN_GUARD_BEGIN
  at::Tensor t;
  if (kiln_error err = init_tensor(st, shape, ndim, init, a, b, seed, &t)) return err;
  register_parameter(m, name, std::move(t));
  KILN_GUARD_END
}

kiln_error kiln_nn_register_buffer_init(kiln_module* m, const char* name,
                                        kiln_dtype dtype, const int64_t* shape,
                                        int ndim, kiln_init init, double a,
                                        double b, uint64_t seed) {
  KILN_CHECK_ARG(m != nullptr && name != nullptr, "NULL argument");
  KILN_CHECK_ARG(ndim >= 0 && (ndim == 0 || shape != nullptr), "bad shape");
  at::ScalarType st;
  KILN_CHECK_ARG(kiln::to_scalar_type(dtype, &st),
                 "unknown dtype " + std::to_string(static_cast<int>(dtype)));
  KILN_GUARD_BEGIN
  at::Tensor t;
  if (kiln_error err = init_tensor(st, shape, ndim, init, a, b, seed, &t)) return err;
  register_buffer(m, name, std::move(t));
  KILN_GUARD_END
}

kiln_error kiln_nn_define(kiln_module* m, const char* source) {
  KILN_CHECK_ARG(m != nullptr && source != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  m->m.define(source);
  KILN_GUARD_END
}

kiln_error kiln_nn_deepcopy(kiln_module* m, kiln_module** out) {
  KILN_CHECK_ARG(m != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  torch::jit::Module c = m->m.deepcopy();
  *out = new kiln_module{std::move(c)};
  KILN_GUARD_END
}

kiln_error kiln_nn_flat_state(kiln_module* m, kiln_tensor** out) {
  KILN_CHECK_ARG(m != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  at::NoGradGuard ng;
  std::vector<at::Tensor> parts;
  for (const auto& p : m->m.named_attributes(/*recurse=*/true)) {
    if (!p.value.isTensor()) continue;
    parts.push_back(p.value.toTensor().detach().reshape({-1}).to(at::kDouble));
  }
  at::Tensor flat = parts.empty() ? at::empty({0}, at::kDouble) : at::cat(parts);
  *out = new kiln_tensor{flat};
  KILN_GUARD_END
}

kiln_error kiln_nn_copy_state(kiln_module* dst, kiln_module* src) {
  KILN_CHECK_ARG(dst != nullptr && src != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  at::NoGradGuard ng;
  std::vector<std::pair<std::string, at::Tensor>> from;
  for (const auto& a : src->m.named_attributes(/*recurse=*/true)) {
    if (a.value.isTensor()) from.emplace_back(a.name, a.value.toTensor());
  }
  size_t i = 0;
  for (const auto& a : dst->m.named_attributes(/*recurse=*/true)) {
    if (!a.value.isTensor()) continue;
    if (i >= from.size() || from[i].first != a.name) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "state mismatch at " + a.name + ": the source has " +
                              (i < from.size() ? from[i].first : std::string("nothing")));
    }
    at::Tensor d = a.value.toTensor();
    if (!d.sizes().equals(from[i].second.sizes())) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "state mismatch: " + a.name + " is " + shape_str(d.sizes()) +
                              " here but " + shape_str(from[i].second.sizes()) + " in the source");
    }
    d.copy_(from[i].second);
    i++;
  }
  if (i != from.size()) return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "the source has more tensors than the destination");
  KILN_GUARD_END
}

kiln_error kiln_nn_forward(kiln_module* m, const kiln_tensor* x, kiln_tensor** out) {
  KILN_CHECK_ARG(m != nullptr && x != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  kiln::sync_threads();
  try {
    at::NoGradGuard ng;
    torch::jit::GraphOptimizerEnabledGuard opt(jit_optimize());
    c10::IValue r = m->m.forward({x->t});
    if (!r.isTensor()) return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "forward returned " + r.tagKind() + ", not a tensor");
    *out = new kiln_tensor{r.toTensor()};
  } catch (...) {
    // Shapes, dtypes or targets that do not fit the model are the caller's.
    return kiln::current_error(KILN_ERROR_INVALID_ARGUMENT, concise);
  }
  KILN_GUARD_END
}

kiln_error kiln_nn_require_grad(kiln_module* m) {
  KILN_CHECK_ARG(m != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  for (at::Tensor p : m->m.parameters(true)) p.set_requires_grad(true);
  KILN_GUARD_END
}

kiln_error kiln_nn_num_params(kiln_module* m, int64_t* out) {
  KILN_CHECK_ARG(m != nullptr && out != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  int64_t n = 0;
  for (const at::Tensor& p : m->m.parameters(true)) n += p.numel();
  *out = n;
  KILN_GUARD_END
}

kiln_error kiln_trainer_new(kiln_module* m, const kiln_train_options* o,
                            kiln_trainer** out) {
  KILN_CHECK_ARG(m != nullptr && o != nullptr && out != nullptr, "NULL argument");
  KILN_CHECK_ARG(o->lr > 0, "learning rate must be > 0, got " + std::to_string(o->lr));
  KILN_CHECK_ARG(o->label_smoothing >= 0 && o->label_smoothing < 1,
                 "label smoothing must be in [0, 1), got " + std::to_string(o->label_smoothing));
  KILN_GUARD_BEGIN
  tune_malloc();
  auto t = std::make_unique<kiln_trainer>();
  t->m = m->m;  // shares the module's object
  for (at::Tensor p : t->m.parameters(true)) {
    p.set_requires_grad(true);
    t->params.push_back(p);
  }
  if (t->params.empty()) return kiln::make_error("the module has no parameters to train");
  t->loss = o->loss;
  t->huber_delta = o->huber_delta > 0 ? o->huber_delta : 1.0;
  t->label_smoothing = o->label_smoothing;
  if (o->class_weights != nullptr) t->class_weights = o->class_weights->t.detach().clone();
  t->clip = o->clip_grad_norm;
  t->channels_last = o->contiguous_format == 0;
  t->device = m->device;
  if (kiln_error e = kiln::set_amp(t.get(), o->amp)) return e;
  t->opt = kiln::make_optimizer(*o, {t->params}, {o->lr});
  if (o->optimizer == KILN_OPTIMIZER_SGD) {
    t->sgd = true;
    for (const at::Tensor& p : t->params) {
      t->keys.push_back(state_key(p));
    }
  }
  *out = t.release();
  KILN_GUARD_END
}

void kiln_trainer_free(kiln_trainer* t) {
  try {
    delete t;
  } catch (...) {
  }
}

kiln_error kiln_trainer_set_lr(kiln_trainer* t, double lr) {
  KILN_CHECK_ARG(t != nullptr, "NULL trainer");
  KILN_CHECK_ARG(lr >= 0, "learning rate must be >= 0");
  KILN_GUARD_BEGIN
  set_lr(t, lr);
  KILN_GUARD_END
}

kiln_error kiln_trainer_step(kiln_trainer* t, const kiln_tensor* x,
                             const kiln_tensor* y, double* loss) {
  KILN_CHECK_ARG(t != nullptr && x != nullptr && y != nullptr && loss != nullptr,
                 "NULL argument");
  KILN_GUARD_BEGIN
  kiln::sync_threads();
  try {
    kiln::enter_train(t);
    if (t->train_m) t->train_m->train(true);
    kiln::dist_failure.clear();
    *loss = train_step(t, x->t, y->t);
  } catch (const kiln::dist_error& e) {
    return kiln::make_error(KILN_ERROR_UNAVAILABLE, e.what());
  } catch (...) {
    if (!kiln::dist_failure.empty()) return kiln::make_error(KILN_ERROR_UNAVAILABLE, kiln::dist_failure);
    // Shapes, dtypes or targets that do not fit the model are the caller's.
    return kiln::current_error(KILN_ERROR_INVALID_ARGUMENT, concise);
  }
  KILN_GUARD_END
}

int64_t kiln_epoch_steps(int64_t n, int64_t batch) {
  if (n <= 0 || batch <= 0) return 0;
  return static_cast<int64_t>(batch_starts(n, batch).size()) - 1;
}

kiln_error kiln_trainer_epoch(kiln_trainer* t, const kiln_tensor* x,
                              const kiln_tensor* y, const int64_t* perm,
                              int64_t n, int64_t batch, const double* lrs,
                              int64_t every, kiln_progress_fn progress,
                              void* ctx, double* loss_sum, int64_t* seen,
                              int* stopped) {
  KILN_CHECK_ARG(t != nullptr && x != nullptr && y != nullptr && perm != nullptr &&
                     lrs != nullptr && loss_sum != nullptr && seen != nullptr &&
                     stopped != nullptr,
                 "NULL argument");
  KILN_CHECK_ARG(n > 0, "no samples to train on");
  KILN_CHECK_ARG(batch > 0, "batch size must be > 0");
  KILN_GUARD_BEGIN
  *loss_sum = 0;
  *seen = 0;
  *stopped = 0;
  const at::Tensor& X = x->t;
  const at::Tensor& Y = y->t;
  int64_t rows = X.size(0);
  if (Y.size(0) != rows) {
    return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "features have " + std::to_string(rows) + " rows but targets " +
                            std::to_string(Y.size(0)));
  }
  for (int64_t i = 0; i < n; i++) {
    if (perm[i] < 0 || perm[i] >= rows) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "sample index " + std::to_string(perm[i]) + " outside [0, " +
                              std::to_string(rows) + ")");
    }
  }
  std::vector<int64_t> starts = batch_starts(n, batch);
  int64_t nsteps = static_cast<int64_t>(starts.size()) - 1;
  kiln::sync_threads();
  at::Tensor idx_all = at::from_blob(const_cast<int64_t*>(perm), {n}, at::kLong);
  try {
    kiln::enter_train(t);
    if (t->train_m) t->train_m->train(true);
    kiln::dist_failure.clear();
    // One gather per epoch into shuffled order; each batch is then a
    // contiguous slice (a view): no per-step copy or gather.
    // On a GPU the gathered epoch is copied there once.
    at::Tensor Xp = on_device(t, X.index_select(0, idx_all));
    ChannelsLastScope cl(t, &Xp);
    at::Tensor Yp = on_device(t, Y.index_select(0, idx_all));
    // Class targets become int64 once per epoch, and are range-checked
    // once, at the first step.
    if (t->loss == KILN_LOSS_CROSS_ENTROPY && Yp.scalar_type() != at::kLong) Yp = Yp.to(at::kLong);
    for (int64_t s = 0; s < nsteps; s++) {
      int64_t b0 = starts[s], b1 = starts[s + 1];
      at::Tensor xb = Xp.slice(0, b0, b1);
      at::Tensor yb = Yp.slice(0, b0, b1);
      set_lr(t, lrs[s]);
      double l = s == 0 ? train_step(t, xb, yb, false, Yp) : train_step(t, xb, yb, false);
      *loss_sum += l * static_cast<double>(b1 - b0);
      *seen += b1 - b0;
      if (progress != nullptr && ((every > 0 && (s + 1) % every == 0) || s + 1 == nsteps)) {
        if (progress(ctx, s + 1, nsteps, *loss_sum, *seen) != 0) {
          *stopped = 1;
          break;
        }
      }
    }
  } catch (const kiln::dist_error& e) {
    return kiln::make_error(KILN_ERROR_UNAVAILABLE, e.what());
  } catch (...) {
    if (!kiln::dist_failure.empty()) return kiln::make_error(KILN_ERROR_UNAVAILABLE, kiln::dist_failure);
    // Shapes, dtypes or targets that do not fit the model are the caller's.
    return kiln::current_error(KILN_ERROR_INVALID_ARGUMENT, concise);
  }
  KILN_GUARD_END
}

kiln_error kiln_trainer_evaluate(kiln_trainer* t, const kiln_tensor* x,
                                 const kiln_tensor* y, int64_t batch,
                                 double* loss, kiln_tensor** outputs) {
  KILN_CHECK_ARG(t != nullptr && x != nullptr && loss != nullptr && outputs != nullptr,
                 "NULL argument");
  KILN_CHECK_ARG(batch > 0, "batch size must be > 0");
  KILN_GUARD_BEGIN
  kiln::sync_threads();
  try {
    at::NoGradGuard ng;
    t->m.train(false);
    int64_t rows = x->t.size(0);
    std::vector<at::Tensor> outs;
    AutocastScope amp(t);
    for (int64_t i = 0; i < rows; i += batch) {
      outs.push_back(run_forward(t, on_device(t, x->t.slice(0, i, std::min(rows, i + batch)))));
    }
    if (outs.empty()) return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "no samples to evaluate");
    at::Tensor all = outs.size() == 1 ? outs[0] : at::cat(outs);
    *loss = y != nullptr ? compute_loss(t, all, on_device(t, y->t)).item<double>() : 0.0;
    // Outputs come back to the CPU, in float32 where autocast made them
    // bf16/fp16.
    if (all.scalar_type() == at::kBFloat16 || all.scalar_type() == at::kHalf) all = all.to(at::kFloat);
    all = all.to(at::kCPU);
    *outputs = new kiln_tensor{all.contiguous()};
  } catch (...) {
    // Shapes, dtypes or targets that do not fit the model are the caller's.
    return kiln::current_error(KILN_ERROR_INVALID_ARGUMENT, concise);
  }
  KILN_GUARD_END
}

kiln_error kiln_trainer_save_state(kiln_trainer* t, const char* path) {
  KILN_CHECK_ARG(t != nullptr && path != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  torch::serialize::OutputArchive ar;
  t->opt->save(ar);
  at::Generator g = at::detail::getDefaultCPUGenerator();
  at::Tensor state;
  {
    std::lock_guard<std::mutex> lock(g.mutex());
    state = g.get_state();
  }
  ar.write("kiln_rng_state", state, /*is_buffer=*/true);
  ar.save_to(path);
  KILN_GUARD_END
}

kiln_error kiln_trainer_load_state(kiln_trainer* t, const char* path) {
  KILN_CHECK_ARG(t != nullptr && path != nullptr, "NULL argument");
  KILN_GUARD_BEGIN
  struct stat st;
  if (stat(path, &st) != 0 && (errno == ENOENT || errno == ENOTDIR)) {
    return kiln::make_error(KILN_ERROR_NOT_FOUND, std::string("no such file: ") + path);
  }
  torch::serialize::InputArchive ar;
  ar.load_from(path);
  t->opt->load(ar);
  at::Tensor state;
  ar.read("kiln_rng_state", state, /*is_buffer=*/true);
  at::Generator g = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
  // Whatever fails here is the file's: not an archive SaveState wrote, or
  // one for another optimizer or network.
  KILN_GUARD_END_AS(KILN_ERROR_INVALID_ARGUMENT)
}

}  // extern "C"
