// Package trainer is the cgo binding for Kiln's training C ABI
// (kiln_train.h): building TorchScript networks from parameters and source,
// and training them with libtorch's autograd and optimizers. Like package
// native it only converts errors and handles; core/nn and core/train build
// on it.
package trainer

/*
#cgo CXXFLAGS: -std=c++17 -O2 -Wall -I/usr/include/torch/csrc/api/include -DUSE_C10D_GLOO
// -lgloo as needed: Debian's libtorch links Gloo as a shared library (dist.cc
// calls it directly); a pip torch's libtorch_cpu exports Gloo itself, and
// then libgloo is not linked.
#cgo LDFLAGS: -ltorch -ltorch_cpu -lc10 -Wl,--as-needed -lgloo -Wl,--no-as-needed -lstdc++
#include <stdlib.h>
#include "kiln_train.h"

int kilnGoProgress(void* ctx, int64_t step, int64_t nsteps, double loss_sum, int64_t seen);

// Runs an epoch whose progress callback is a Go function identified by a
// cgo.Handle, passed as an integer.
static kiln_error kiln_go_epoch(kiln_trainer* t, const kiln_tensor* x,
                                const kiln_tensor* y, const int64_t* perm,
                                int64_t n, int64_t batch, const double* lrs,
                                int64_t every, uintptr_t handle,
                                double* loss_sum, int64_t* seen, int* stopped) {
  return kiln_trainer_epoch(t, x, y, perm, n, batch, lrs, every,
                            handle ? kilnGoProgress : NULL, (void*)handle,
                            loss_sum, seen, stopped);
}
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"

	"github.com/kilnml/kiln/native"
)

// takeErr converts a kiln_error into a *native.Error and frees it.
func takeErr(e C.kiln_error) error { return native.TakeError(unsafe.Pointer(e)) }

func mod(m native.Module) *C.kiln_module { return (*C.kiln_module)(m.Ptr()) }
func ten(t native.Tensor) *C.kiln_tensor { return (*C.kiln_tensor)(t.Ptr()) }

// Init selects how RegisterParameterInit and RegisterBufferInit fill a new
// tensor.
type Init int32

// Initializations, with the values of kiln_init.
const (
	InitZeros   Init = C.KILN_INIT_ZEROS
	InitOnes    Init = C.KILN_INIT_ONES
	InitUniform Init = C.KILN_INIT_UNIFORM // uniform on [A, B)
	InitNormal  Init = C.KILN_INIT_NORMAL  // mean A, standard deviation B
)

// NewModule creates an empty TorchScript module of the given class in
// training mode. The caller owns the result.
func NewModule(class string) (native.Module, error) {
	cs := C.CString(class)
	defer C.free(unsafe.Pointer(cs))
	var out *C.kiln_module
	if err := takeErr(C.kiln_nn_new(cs, &out)); err != nil {
		return native.Module{}, err
	}
	return native.ModuleFromPtr(unsafe.Pointer(out)), nil
}

// RegisterParameter registers a copy of v (detached, contiguous) as the
// parameter name of m, requiring grad, as torch::nn::Module's
// register_parameter does. It errors when m already has an attribute name.
func RegisterParameter(m native.Module, name string, v native.Tensor) error {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_nn_register_parameter(mod(m), cs, ten(v)))
}

// RegisterBuffer registers a copy of v (detached, contiguous) as the buffer
// name of m, as torch::nn::Module's register_buffer does. It errors when m
// already has an attribute name.
func RegisterBuffer(m native.Module, name string, v native.Tensor) error {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_nn_register_buffer(mod(m), cs, ten(v)))
}

// RegisterParameterInit registers a new parameter name of m with dtype dt
// and the given shape, requiring grad, filled by init (a and b as Init
// describes) from a private generator seeded with seed.
func RegisterParameterInit(m native.Module, name string, dt native.DType, shape []int64, init Init, a, b float64, seed uint64) error {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_nn_register_parameter_init(mod(m), cs, C.kiln_dtype(dt), shapePtr(shape),
		C.int(len(shape)), C.kiln_init(init), C.double(a), C.double(b), C.uint64_t(seed)))
}

// RegisterBufferInit registers a new buffer name of m with dtype dt and the
// given shape, filled by init (a and b as Init describes) from a private
// generator seeded with seed: e.g. batchnorm's running statistics.
func RegisterBufferInit(m native.Module, name string, dt native.DType, shape []int64, init Init, a, b float64, seed uint64) error {
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_nn_register_buffer_init(mod(m), cs, C.kiln_dtype(dt), shapePtr(shape),
		C.int(len(shape)), C.kiln_init(init), C.double(a), C.double(b), C.uint64_t(seed)))
}

// shapePtr points at shape's first element, or is nil for a scalar shape.
func shapePtr(shape []int64) *C.int64_t {
	if len(shape) == 0 {
		return nil
	}
	return (*C.int64_t)(unsafe.Pointer(&shape[0]))
}

// Define compiles TorchScript methods into the module's class.
func Define(m native.Module, src string) error {
	cs := C.CString(src)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_nn_define(mod(m), cs))
}

// DeepCopy copies the module with its own parameter storage.
func DeepCopy(m native.Module) (native.Module, error) {
	var out *C.kiln_module
	if err := takeErr(C.kiln_nn_deepcopy(mod(m), &out)); err != nil {
		return native.Module{}, err
	}
	return native.ModuleFromPtr(unsafe.Pointer(out)), nil
}

// FlatState returns every parameter and buffer concatenated as float64.
func FlatState(m native.Module) (native.Tensor, error) {
	var out *C.kiln_tensor
	if err := takeErr(C.kiln_nn_flat_state(mod(m), &out)); err != nil {
		return native.Tensor{}, err
	}
	return native.TensorFromPtr(unsafe.Pointer(out)), nil
}

// CopyState copies src's parameters and buffers into dst's, in place.
func CopyState(dst, src native.Module) error {
	return takeErr(C.kiln_nn_copy_state(mod(dst), mod(src)))
}

// Forward runs forward(x) without gradients; the caller owns the result.
func Forward(m native.Module, x native.Tensor) (native.Tensor, error) {
	var out *C.kiln_tensor
	if err := takeErr(C.kiln_nn_forward(mod(m), ten(x), &out)); err != nil {
		return native.Tensor{}, err
	}
	return native.TensorFromPtr(unsafe.Pointer(out)), nil
}

// RequireGrad marks every parameter as requiring gradients.
func RequireGrad(m native.Module) error { return takeErr(C.kiln_nn_require_grad(mod(m))) }

// NumParams returns the number of parameter elements.
func NumParams(m native.Module) (int64, error) {
	var n C.int64_t
	err := takeErr(C.kiln_nn_num_params(mod(m), &n))
	return int64(n), err
}

// Loss mirrors kiln_loss.
type Loss int32

// Losses, with the values of kiln_loss.
const (
	LossMSE          Loss = C.KILN_LOSS_MSE
	LossL1           Loss = C.KILN_LOSS_L1
	LossHuber        Loss = C.KILN_LOSS_HUBER
	LossBCEWithLogit Loss = C.KILN_LOSS_BCE_LOGITS
	LossCrossEntropy Loss = C.KILN_LOSS_CROSS_ENTROPY
)

// Optimizer mirrors kiln_optimizer.
type Optimizer int32

// Optimizers, with the values of kiln_optimizer.
const (
	SGD     Optimizer = C.KILN_OPTIMIZER_SGD
	Adam    Optimizer = C.KILN_OPTIMIZER_ADAM
	AdamW   Optimizer = C.KILN_OPTIMIZER_ADAMW
	RMSprop Optimizer = C.KILN_OPTIMIZER_RMSPROP
)

// Options mirrors kiln_train_options.
type Options struct {
	Loss           Loss
	HuberDelta     float64
	LabelSmoothing float64
	ClassWeights   native.Tensor // zero value: none
	Optimizer      Optimizer
	LR             float64
	Momentum       float64
	WeightDecay    float64
	Beta1, Beta2   float64
	Eps            float64
	Alpha          float64
	Nesterov       bool
	ClipGradNorm   float64
	AMP            AMP
	// ContiguousFormat keeps PyTorch's default layout in CPU epochs of
	// convolutional networks instead of channels-last memory.
	ContiguousFormat bool
}

// AMP mirrors kiln_amp: autocast of forward and loss.
type AMP int32

// Mixed precision modes, with the values of kiln_amp.
const (
	AMPNone AMP = C.KILN_AMP_NONE
	AMPBF16 AMP = C.KILN_AMP_BF16
	AMPFP16 AMP = C.KILN_AMP_FP16
)

func cbool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// Trainer is a raw handle to a kiln_trainer; Free it exactly once.
type Trainer struct{ p *C.kiln_trainer }

// Valid reports whether t refers to a trainer.
func (t Trainer) Valid() bool { return t.p != nil }

// NewTrainer makes a trainer over m's parameters. It holds its own
// reference to m's object.
func NewTrainer(m native.Module, o Options) (Trainer, error) {
	co := o.c()
	var out *C.kiln_trainer
	if err := takeErr(C.kiln_trainer_new(mod(m), &co, &out)); err != nil {
		return Trainer{}, err
	}
	return Trainer{out}, nil
}

// c converts o into kiln_train_options.
func (o Options) c() C.kiln_train_options {
	return C.kiln_train_options{
		loss:            C.kiln_loss(o.Loss),
		huber_delta:     C.double(o.HuberDelta),
		label_smoothing: C.double(o.LabelSmoothing),
		class_weights:   ten(o.ClassWeights),
		optimizer:       C.kiln_optimizer(o.Optimizer),
		lr:              C.double(o.LR),
		momentum:        C.double(o.Momentum),
		weight_decay:    C.double(o.WeightDecay),
		beta1:           C.double(o.Beta1),
		beta2:           C.double(o.Beta2),
		eps:             C.double(o.Eps),
		alpha:           C.double(o.Alpha),
		nesterov:        cbool(o.Nesterov),
		clip_grad_norm:  C.double(o.ClipGradNorm),
		amp:             C.kiln_amp(o.AMP),

		contiguous_format: cbool(o.ContiguousFormat),
	}
}

// Free releases the trainer.
func (t Trainer) Free() { C.kiln_trainer_free(t.p) }

// SetLR sets the learning rate.
func (t Trainer) SetLR(lr float64) error { return takeErr(C.kiln_trainer_set_lr(t.p, C.double(lr))) }

// Step trains on one batch and returns its mean loss.
func (t Trainer) Step(x, y native.Tensor) (float64, error) {
	var l C.double
	err := takeErr(C.kiln_trainer_step(t.p, ten(x), ten(y), &l))
	return float64(l), err
}

// EpochSteps returns the number of steps an epoch over n samples takes.
func EpochSteps(n, batch int64) int64 {
	return int64(C.kiln_epoch_steps(C.int64_t(n), C.int64_t(batch)))
}

// Progress is called during Epoch; returning false stops the epoch.
type Progress func(step, nsteps int64, lossSum float64, seen int64) bool

// EpochResult is what Epoch did.
type EpochResult struct {
	LossSum float64 // sum over samples of their loss
	Seen    int64   // samples trained on
	Stopped bool    // progress asked to stop
}

// Epoch trains over the rows perm of x and y in one call, in batches,
// step i at learning rate lrs[i] (len(lrs) must be EpochSteps). progress,
// if not nil, runs every `every` steps and after the last.
func (t Trainer) Epoch(x, y native.Tensor, perm []int64, batch int64, lrs []float64, every int64, progress Progress) (EpochResult, error) {
	if len(perm) == 0 {
		return EpochResult{}, native.Errorf(native.InvalidArgument, "no samples to train on")
	}
	if want := EpochSteps(int64(len(perm)), batch); int64(len(lrs)) != want {
		return EpochResult{}, native.Errorf(native.InvalidArgument, "%d learning rates for %d steps", len(lrs), want)
	}
	var h cgo.Handle
	if progress != nil {
		h = cgo.NewHandle(progress)
		defer h.Delete()
	}
	var sum C.double
	var seen C.int64_t
	var stopped C.int
	err := takeErr(C.kiln_go_epoch(t.p, ten(x), ten(y), (*C.int64_t)(unsafe.Pointer(&perm[0])),
		C.int64_t(len(perm)), C.int64_t(batch), (*C.double)(unsafe.Pointer(&lrs[0])),
		C.int64_t(every), C.uintptr_t(h), &sum, &seen, &stopped))
	return EpochResult{LossSum: float64(sum), Seen: int64(seen), Stopped: stopped != 0}, err
}

// Evaluate runs the module in eval mode over x in batches; it returns the
// outputs (owned by the caller) and the mean loss against y (y may be the
// zero Tensor, giving loss 0).
func (t Trainer) Evaluate(x, y native.Tensor, batch int64) (native.Tensor, float64, error) {
	var out *C.kiln_tensor
	var l C.double
	if err := takeErr(C.kiln_trainer_evaluate(t.p, ten(x), ten(y), C.int64_t(batch), &l, &out)); err != nil {
		return native.Tensor{}, 0, err
	}
	return native.TensorFromPtr(unsafe.Pointer(out)), float64(l), nil
}

// SaveState writes the optimizer state and libtorch's generator state.
func (t Trainer) SaveState(path string) error {
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_trainer_save_state(t.p, cs))
}

// LoadState restores what SaveState wrote. A missing file is NOT_FOUND;
// any other failure to read it (not an archive SaveState wrote, or one for
// another optimizer or network) is INVALID_ARGUMENT.
func (t Trainer) LoadState(path string) error {
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	return takeErr(C.kiln_trainer_load_state(t.p, cs))
}
