// trainer_internal.h — the struct behind kiln_trainer, shared by train.cc
// and dist.cc. Not part of the ABI.
#ifndef KILN_TRAINER_INTERNAL_H
#define KILN_TRAINER_INTERNAL_H

#include <torch/csrc/jit/api/module.h>
#include <torch/optim/optimizer.h>

#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../internal.h"
#include "kiln_train.h"

namespace {
// The key of an optimizer's per-parameter state: the TensorImpl's address
// as text in libtorch 1.x, the address itself in 2.x.
using StateKey =
    std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state())>::key_type;

template <typename K>
K state_key_as(const at::Tensor& p) {
  if constexpr (std::is_same_v<K, std::string>) {
    std::ostringstream s;  // what libtorch's optimizers use for the text key
    s << p.unsafeGetTensorImpl();
    return s.str();
  } else {
    return static_cast<K>(p.unsafeGetTensorImpl());
  }
}

inline StateKey state_key(const at::Tensor& p) { return state_key_as<StateKey>(p); }
}  // namespace

struct kiln_trainer {
  torch::jit::Module m;
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::Optimizer> opt;
  kiln_loss loss = KILN_LOSS_MSE;
  double huber_delta = 1.0;
  double label_smoothing = 0.0;
  at::Tensor class_weights;  // undefined when none
  double clip = 0.0;
  // The module's device (kiln_module_to); batches are copied there.
  c10::Device device{c10::kCPU};
  // Autocast dtype of forward and loss; Undefined: none (kiln_amp).
  at::ScalarType amp = at::ScalarType::Undefined;
  // Epochs on the CPU run convolution weights and image batches in
  // channels-last memory (train.cc: ChannelsLastScope).
  bool channels_last = true;
  // SGD runs Kiln's own step (sgd_step) over the optimizer's state; keys
  // are the optimizer's state keys of params, computed once.
  bool sgd = false;
  std::vector<StateKey> keys;
  // Data-parallel training (dist.cc): when set, runs after backward and
  // before clipping, averaging the gradients over the process group;
  // throws kiln::dist_error when a collective fails.
  std::function<void(kiln_trainer*)> reduce_grads;
  // Runs just before backward (dist.cc: readies the buckets that hooks on
  // the parameters fill during backward).
  std::function<void(kiln_trainer*)> before_backward;
  // Fine-tuning (finetune.cc): each optimizer parameter group's learning
  // rate as a multiple of the scheduled rate (empty: 1 for every group),
  // and submodules kept in eval mode while the rest trains (freeze_bn).
  std::vector<double> lr_scale;
  std::vector<torch::jit::Module> eval_modules;
  // Synchronized batch norm (dist.cc, kiln_trainer_set_sync_batchnorm):
  // when set, training steps run this module's forward instead of m's. It
  // holds m's very tensors (parameters and buffers), with batch-norm
  // layers whose batch statistics are all-reduced over a process group;
  // evaluation and the saved model keep m's plain batch norm.
  std::shared_ptr<torch::jit::Module> train_m;
  // Keeps the process group registered for train_m's forward.
  std::shared_ptr<void> sync_token;
};

namespace kiln {
// A collective failed (a peer died, hung or left): kiln_trainer_epoch and
// kiln_trainer_step return it as KILN_ERROR_UNAVAILABLE.
struct dist_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Puts the trainer's module in train mode, except the submodules kept in
// eval mode (frozen batch norm: running statistics neither used from the
// batch nor updated).
inline void enter_train(kiln_trainer* t) {
  t->m.train(true);
  for (auto& sub : t->eval_modules) sub.train(false);
}

// glibc malloc thresholds for training (see train.cc), once per process.
void tune_malloc_once();

// An optimizer of o's kind and hyper-parameters over groups, group i at
// learning rate lrs[i]. Throws std::invalid_argument for an unknown kind.
std::unique_ptr<torch::optim::Optimizer> make_optimizer(
    const kiln_train_options& o, const std::vector<std::vector<at::Tensor>>& groups,
    const std::vector<double>& lrs);
// Sets t->amp from a kiln_amp for a trainer whose device is set: fp16
// only on CUDA (UNSUPPORTED on the CPU), an unknown mode INVALID_ARGUMENT.
// Defined in train.cc.
kiln_error set_amp(kiln_trainer* t, kiln_amp amp);


// A collective inside forward or backward (synchronized batch norm) failed
// on this thread: TorchScript's interpreter rethrows exceptions as its own
// errors, so the collective records its failure here as well, and
// kiln_trainer_epoch/kiln_trainer_step report it as UNAVAILABLE. Cleared at
// the start of each.
inline thread_local std::string dist_failure;
}  // namespace kiln

#endif  // KILN_TRAINER_INTERNAL_H
