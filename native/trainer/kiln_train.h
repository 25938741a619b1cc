/*
 * kiln_train.h — Kiln's flat C ABI for building and training models.
 *
 * An extension of kiln.h (whose rules apply unchanged: no C++ exception
 * escapes, errors carry a code and are freed with kiln_error_free, every
 * handle has one owner and a *_free function). It lives in its own cgo
 * package so that its heavy C++ (torch/torch.h) compiles apart from the
 * inference core.
 *
 * A Kiln network is a TorchScript module built here: parameters and buffers
 * registered with PyTorch's initializations, and a forward method compiled
 * from TorchScript source. Training runs that same module in train mode with
 * autograd; the trained module is saved with kiln_module_save.
 */
#ifndef KILN_TRAIN_H
#define KILN_TRAIN_H

#include "../kiln.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- building networks ------------------------------------------------ */

/* Initializations for kiln_nn_register_parameter_init and
 * kiln_nn_register_buffer_init. */
typedef enum {
  KILN_INIT_ZEROS = 0,
  KILN_INIT_ONES = 1,
  KILN_INIT_UNIFORM = 2, /* uniform on [a, b) */
  KILN_INIT_NORMAL = 3,  /* normal with mean a, standard deviation b */
} kiln_init;

/* Creates an empty module of TorchScript class class_name (e.g.
 * "__torch__.kiln.Net") with a `training` attribute, in training mode. */
kiln_error kiln_nn_new(const char* class_name, kiln_module** out);

/* Registers a copy of value (detached, contiguous) as the parameter name,
 * requiring grad: torch::nn::Module::register_parameter. */
kiln_error kiln_nn_register_parameter(kiln_module* m, const char* name,
                                      const kiln_tensor* value);

/* Registers a copy of value (detached, contiguous) as the buffer name, not
 * requiring grad: torch::nn::Module::register_buffer. */
kiln_error kiln_nn_register_buffer(kiln_module* m, const char* name,
                                   const kiln_tensor* value);

/* Registers a new parameter name of the given dtype and shape (ndim
 * dimensions), requiring grad, initialized by init from a private generator
 * seeded with seed. */
kiln_error kiln_nn_register_parameter_init(kiln_module* m, const char* name,
                                           kiln_dtype dtype, const int64_t* shape,
                                           int ndim, kiln_init init, double a,
                                           double b, uint64_t seed);

/* Registers a new buffer name of the given dtype and shape (ndim
 * dimensions), initialized by init from a private generator seeded with
 * seed (e.g. batchnorm's running statistics). */
kiln_error kiln_nn_register_buffer_init(kiln_module* m, const char* name,
                                        kiln_dtype dtype, const int64_t* shape,
                                        int ndim, kiln_init init, double a,
                                        double b, uint64_t seed);

/* Compiles TorchScript source (methods of the module's class, e.g.
 * "def forward(self, x: Tensor) -> Tensor: ..."). */
kiln_error kiln_nn_define(kiln_module* m, const char* source);

/* A deep copy: new parameter and buffer storage, same code. */
kiln_error kiln_nn_deepcopy(kiln_module* m, kiln_module** out);

/* Every parameter and buffer, flattened and concatenated in registration
 * order into one float64 tensor (for comparing weights bit for bit). */
kiln_error kiln_nn_flat_state(kiln_module* m, kiln_tensor** out);

/* Copies every parameter and buffer of src into dst's tensors in place;
 * both must have the same attribute names and shapes (a deepcopy, or the
 * same network loaded from a checkpoint). */
kiln_error kiln_nn_copy_state(kiln_module* dst, kiln_module* src);

/* Marks every parameter as requiring grad (after loading a checkpoint). */
kiln_error kiln_nn_require_grad(kiln_module* m);

/* Number of parameters (elements) that require grad. */
kiln_error kiln_nn_num_params(kiln_module* m, int64_t* out);

/* Runs forward(x) without gradients (NoGradGuard, not inference mode: a
 * module that has trained holds autodiff plans that inference mode
 * rejects) and returns the output tensor. */
kiln_error kiln_nn_forward(kiln_module* m, const kiln_tensor* x, kiln_tensor** out);

/* ---- training --------------------------------------------------------- */

typedef enum {
  KILN_LOSS_MSE = 0,
  KILN_LOSS_L1 = 1,
  KILN_LOSS_HUBER = 2,
  KILN_LOSS_BCE_LOGITS = 3,
  KILN_LOSS_CROSS_ENTROPY = 4,
} kiln_loss;

typedef enum {
  KILN_OPTIMIZER_SGD = 0,
  KILN_OPTIMIZER_ADAM = 1,
  KILN_OPTIMIZER_ADAMW = 2,
  KILN_OPTIMIZER_RMSPROP = 3,
} kiln_optimizer;

/* Mixed precision: autocast (torch.autocast) of forward and loss on the
 * module's device; backward and the optimizer step stay in the
 * parameters' dtype (float32). */
typedef enum {
  KILN_AMP_NONE = 0,
  KILN_AMP_BF16 = 1,
  KILN_AMP_FP16 = 2, /* CUDA only */
} kiln_amp;

/* Loss, optimizer and clipping. Fields an optimizer does not use are
 * ignored. class_weights (CROSS_ENTROPY only) may be NULL; the trainer keeps
 * its own reference to it. The trainer runs on the device the module is on
 * (kiln_module_to): batches given on the CPU are copied there. */
typedef struct {
  kiln_loss loss;
  double huber_delta;
  double label_smoothing;
  const kiln_tensor* class_weights;
  kiln_optimizer optimizer;
  double lr;
  double momentum;
  double weight_decay;
  double beta1, beta2, eps;
  double alpha; /* RMSprop smoothing constant */
  int nesterov;
  double clip_grad_norm; /* <= 0: no clipping */
  kiln_amp amp;
  /* 0: a CPU epoch of a network with 4-D (convolution) weights runs in
   * channels-last memory (same values, faster oneDNN convolutions and
   * pooling); 1: tensors keep PyTorch's default contiguous layout. */
  int contiguous_format;
} kiln_train_options;

typedef struct kiln_trainer kiln_trainer;

/* A trainer for module m (which it references; m stays owned by the
 * caller and must outlive nothing: the trainer holds its own reference). */
kiln_error kiln_trainer_new(kiln_module* m, const kiln_train_options* o,
                            kiln_trainer** out);
void kiln_trainer_free(kiln_trainer* t);

/* Sets the learning rate of every parameter group. */
kiln_error kiln_trainer_set_lr(kiln_trainer* t, double lr);

/* One step on a batch in train mode: forward, loss, backward, clipping,
 * optimizer step. *loss receives the batch's mean loss. */
kiln_error kiln_trainer_step(kiln_trainer* t, const kiln_tensor* x,
                             const kiln_tensor* y, double* loss);

/* Progress callback of kiln_trainer_epoch: steps done of nsteps, the sum of
 * per-sample losses so far and the samples seen. A nonzero return stops
 * the epoch after the step just done. */
typedef int (*kiln_progress_fn)(void* ctx, int64_t step, int64_t nsteps,
                                double loss_sum, int64_t seen);

/* One epoch in one call: the samples perm[0..n) of x and y (rows), in
 * batches of `batch` (a trailing batch of one sample joins the batch
 * before it, since batch norm cannot train on one sample), the learning
 * rate of step i being lrs[i] (lrs holds one rate per step: see
 * kiln_epoch_steps). progress (may be NULL) runs every `every` steps and
 * after the last. The epoch's samples are gathered once, in perm order (a
 * copy of those rows), and batches are slices of that copy. On return
 * *loss_sum and *seen cover the steps done, and
 * *stopped is 1 when progress asked to stop. */
kiln_error kiln_trainer_epoch(kiln_trainer* t, const kiln_tensor* x,
                              const kiln_tensor* y, const int64_t* perm,
                              int64_t n, int64_t batch, const double* lrs,
                              int64_t every, kiln_progress_fn progress,
                              void* ctx, double* loss_sum, int64_t* seen,
                              int* stopped);

/* The number of steps kiln_trainer_epoch takes for n samples. */
int64_t kiln_epoch_steps(int64_t n, int64_t batch);

/* Runs the module in eval mode without gradients over x in batches,
 * returning the concatenated outputs and the mean loss against y (y may be
 * NULL: *loss is then 0). The module is left in eval mode. */
kiln_error kiln_trainer_evaluate(kiln_trainer* t, const kiln_tensor* x,
                                 const kiln_tensor* y, int64_t batch,
                                 double* loss, kiln_tensor** outputs);

/* Writes the optimizer's state and libtorch's default CPU generator state
 * to path (a torch::serialize archive); load restores both. The trainer
 * must have been made for a module with the same parameters. Load fails
 * with NOT_FOUND for a missing file and INVALID_ARGUMENT for any other it
 * cannot restore from. */
kiln_error kiln_trainer_save_state(kiln_trainer* t, const char* path);
kiln_error kiln_trainer_load_state(kiln_trainer* t, const char* path);

/* ---- fine-tuning (finetune.cc) ---------------------------------------- */

/* A parameter group of kiln_trainer_new_finetune: the parameters whose
 * names start with prefix, trained at learning rate lr (> 0). */
typedef struct {
  const char* prefix;
  double lr;
} kiln_param_group;

/* A trainer for any TorchScript module m (e.g. one torch.jit.load read),
 * over its parameters as named_parameters names them ("layer1.0.conv1.weight"):
 *  - a parameter whose name starts with one of the nfreeze prefixes in
 *    freeze is frozen: requires_grad false, left out of the optimizer, so it
 *    stays bit-identical; every other parameter requires grad;
 *  - a trainable parameter goes to the first of the ngroups groups whose
 *    prefix its name starts with and trains at that group's lr, the others
 *    at o->lr; a schedule (kiln_trainer_set_lr, an epoch's lrs) scales
 *    every group's rate in proportion (group lr * rate / o->lr);
 *  - freeze_bn nonzero keeps the submodules under the freeze prefixes in
 *    eval mode while the rest trains (batch norm then normalizes with, and
 *    does not update, its running statistics); otherwise the whole module
 *    switches between train and eval mode, as model.train() does.
 * A prefix that matches no parameter, an empty prefix, a group lr <= 0 and
 * freezing every parameter are INVALID_ARGUMENT. *trainable receives the
 * number of trainable parameter elements (may be NULL). */
kiln_error kiln_trainer_new_finetune(kiln_module* m, const kiln_train_options* o,
                                     const char* const* freeze, int nfreeze,
                                     const kiln_param_group* groups, int ngroups,
                                     int freeze_bn, int64_t* trainable,
                                     kiln_trainer** out);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* KILN_TRAIN_H */
