// finetune.cc — training any TorchScript module: frozen parameters by name
// prefix, per-group learning rates, frozen batch norm (kiln_train.h).
#include <torch/csrc/jit/api/module.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <string>
#include <vector>

#include "../internal.h"
#include "kiln_train.h"
#include "trainer_internal.h"

namespace {

bool has_prefix(const std::string& name, const std::string& prefix) {
  return name.compare(0, prefix.size(), prefix) == 0;
}

// Whether submodule name lies under prefix: "layer1" and "layer1.0.bn1"
// are under "layer1.", "conv1" under "conv1." and under "conv".
bool module_under(const std::string& name, const std::string& prefix) {
  return has_prefix(name, prefix) || has_prefix(name + ".", prefix);
}

}  // namespace

extern "C" {

kiln_error kiln_trainer_new_finetune(kiln_module* m, const kiln_train_options* o,
                                     const char* const* freeze, int nfreeze,
                                     const kiln_param_group* groups, int ngroups,
                                     int freeze_bn, int64_t* trainable,
                                     kiln_trainer** out) {
  KILN_CHECK_ARG(m != nullptr && o != nullptr && out != nullptr, "NULL argument");
  KILN_CHECK_ARG(nfreeze >= 0 && (nfreeze == 0 || freeze != nullptr), "bad freeze list");
  KILN_CHECK_ARG(ngroups >= 0 && (ngroups == 0 || groups != nullptr), "bad parameter groups");
  KILN_CHECK_ARG(o->lr > 0, "learning rate must be > 0, got " + std::to_string(o->lr));
  KILN_CHECK_ARG(o->label_smoothing >= 0 && o->label_smoothing < 1,
                 "label smoothing must be in [0, 1), got " + std::to_string(o->label_smoothing));
  std::vector<std::string> fr;
  for (int i = 0; i < nfreeze; i++) {
    KILN_CHECK_ARG(freeze[i] != nullptr && freeze[i][0] != '\0', "freeze prefix " + std::to_string(i) + " is empty");
    fr.emplace_back(freeze[i]);
  }
  std::vector<std::string> gp;
  std::vector<double> lrs{o->lr};
  for (int i = 0; i < ngroups; i++) {
    KILN_CHECK_ARG(groups[i].prefix != nullptr && groups[i].prefix[0] != '\0',
                   "parameter group " + std::to_string(i) + " has an empty prefix");
    KILN_CHECK_ARG(groups[i].lr > 0, "parameter group \"" + std::string(groups[i].prefix) +
                                         "\": learning rate must be > 0, got " + std::to_string(groups[i].lr));
    gp.emplace_back(groups[i].prefix);
    lrs.push_back(groups[i].lr);
  }
  KILN_GUARD_BEGIN
  kiln::tune_malloc_once();
  auto t = std::make_unique<kiln_trainer>();
  t->m = m->m;  // shares the module's object
  // Group 0 is the default group (o->lr), group i+1 the caller's group i.
  std::vector<std::vector<at::Tensor>> members(gp.size() + 1);
  std::vector<int64_t> fr_hits(fr.size()), gp_hits(gp.size());
  int64_t n_trainable = 0;
  for (const auto& np : t->m.named_parameters(/*recurse=*/true)) {
    at::Tensor p = np.value;
    bool frozen = false;
    for (size_t i = 0; i < fr.size(); i++) {
      if (has_prefix(np.name, fr[i])) {
        fr_hits[i]++;
        frozen = true;
      }
    }
    p.set_requires_grad(!frozen);
    if (frozen) continue;
    size_t g = 0;
    for (size_t i = 0; i < gp.size(); i++) {
      if (has_prefix(np.name, gp[i])) {
        gp_hits[i]++;
        g = i + 1;
        break;
      }
    }
    members[g].push_back(p);
    n_trainable += p.numel();
  }
  for (size_t i = 0; i < fr.size(); i++) {
    if (fr_hits[i] == 0) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                              "freeze prefix \"" + fr[i] + "\" matches no parameter of the model");
    }
  }
  for (size_t i = 0; i < gp.size(); i++) {
    if (gp_hits[i] == 0) {
      return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT,
                              "parameter group \"" + gp[i] +
                                  "\" matches no trainable parameter (none named so, frozen, or taken by an earlier group)");
    }
  }
  // Empty groups are dropped (an optimizer group must have parameters);
  // lr_scale keeps each remaining group's rate relative to o->lr.
  std::vector<std::vector<at::Tensor>> used;
  std::vector<double> used_lrs;
  for (size_t g = 0; g < members.size(); g++) {
    if (members[g].empty()) continue;
    for (const at::Tensor& p : members[g]) t->params.push_back(p);
    used.push_back(members[g]);
    used_lrs.push_back(lrs[g]);
    t->lr_scale.push_back(lrs[g] / o->lr);
  }
  if (t->params.empty()) {
    return kiln::make_error(KILN_ERROR_INVALID_ARGUMENT, "every parameter is frozen: nothing to train");
  }
  if (freeze_bn != 0) {
    for (const auto& sub : t->m.named_modules()) {
      if (sub.name.empty()) continue;
      for (const std::string& f : fr) {
        if (module_under(sub.name, f)) {
          t->eval_modules.push_back(sub.value);
          break;
        }
      }
    }
  }
  t->loss = o->loss;
  t->huber_delta = o->huber_delta > 0 ? o->huber_delta : 1.0;
  t->label_smoothing = o->label_smoothing;
  if (o->class_weights != nullptr) t->class_weights = o->class_weights->t.detach().clone();
  t->clip = o->clip_grad_norm;
  t->channels_last = o->contiguous_format == 0;
  t->device = m->device;
  if (kiln_error e = kiln::set_amp(t.get(), o->amp)) return e;
  t->opt = kiln::make_optimizer(*o, used, used_lrs);
  if (o->optimizer == KILN_OPTIMIZER_SGD && used.size() == 1) {
    // Kiln's own SGD step reads group 0's options: one group only.
    t->sgd = true;
    for (const at::Tensor& p : t->params) t->keys.push_back(state_key(p));
  }
  if (trainable != nullptr) *trainable = n_trainable;
  *out = t.release();
  KILN_GUARD_END
}

}  // extern "C"
