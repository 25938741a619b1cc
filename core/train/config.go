// Package train trains Kiln networks (core/nn) on in-memory data
// (core/data) in the Go core: one C call per epoch runs forward, loss,
// backward, clipping and the optimizer step over every batch, with
// validation each epoch, early stopping, atomic checkpoints that resume
// with optimizer and RNG state, progress events, cancellation through a
// context, and saving as a Kiln model package (TorchScript with the
// preprocessing folded into forward, plus a manifest).
package train

import (
	"cmp"
	"fmt"
	"math"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"

	"github.com/kilnml/kiln/core/dist"

	"github.com/kilnml/kiln/native/trainer"
)

// Loss configures the training loss.
type Loss struct {
	// Type is mse, l1, huber, bce_with_logits or cross_entropy (on raw
	// outputs), or Keras's binary_crossentropy (on a network ending in a
	// sigmoid), categorical_crossentropy or
	// sparse_categorical_crossentropy (on one ending in a softmax): those
	// train as bce_with_logits and cross_entropy on the activation's input,
	// and the saved model returns probabilities (see TrainSpec).
	Type string `json:"type"`
	// HuberDelta is huber's threshold (default 1).
	HuberDelta float64 `json:"huber_delta,omitempty"`
	// LabelSmoothing of cross_entropy, in [0, 1).
	LabelSmoothing float64 `json:"label_smoothing,omitempty"`
	// ClassWeights of cross_entropy, one per class; empty means equal.
	ClassWeights []float64 `json:"class_weights,omitempty"`
}

// Optimizer configures the optimizer.
type Optimizer struct {
	// Type is sgd, adam, adamw or rmsprop.
	Type string `json:"type"`
	// LR is the base learning rate (required, > 0).
	LR float64 `json:"lr"`
	// Momentum of sgd and rmsprop.
	Momentum float64 `json:"momentum,omitempty"`
	// Nesterov momentum for sgd.
	Nesterov bool `json:"nesterov,omitempty"`
	// WeightDecay (L2 for sgd, adam and rmsprop; decoupled for adamw).
	WeightDecay float64 `json:"weight_decay,omitempty"`
	// Beta1, Beta2 and Eps of adam and adamw (defaults 0.9, 0.999, 1e-8).
	Beta1 float64 `json:"beta1,omitempty"`
	Beta2 float64 `json:"beta2,omitempty"`
	Eps   float64 `json:"eps,omitempty"`
	// Alpha is rmsprop's smoothing constant (default 0.99).
	Alpha float64 `json:"alpha,omitempty"`
}

// Schedule configures the learning rate over training.
type Schedule struct {
	// Type is "" or none (constant), step or cosine.
	Type string `json:"type,omitempty"`
	// StepEpochs and Gamma: step multiplies the rate by Gamma every
	// StepEpochs epochs (defaults 10 and 0.1).
	StepEpochs int     `json:"step_epochs,omitempty"`
	Gamma      float64 `json:"gamma,omitempty"`
	// MinLR is where cosine ends.
	MinLR float64 `json:"min_lr,omitempty"`
	// WarmupEpochs ramps the rate linearly from near 0 over the first
	// epochs (fractions allowed), before any schedule.
	WarmupEpochs float64 `json:"warmup_epochs,omitempty"`
}

// EarlyStopping stops when the monitored validation metric has not
// improved for Patience epochs, and restores the best epoch's weights.
type EarlyStopping struct {
	Patience int `json:"patience"`
	// Metric is a validation metric name (loss, accuracy, f1, precision,
	// recall, mse, mae, r2); default loss.
	Metric string `json:"metric,omitempty"`
	// MinDelta is the smallest change counted as improvement.
	MinDelta float64 `json:"min_delta,omitempty"`
	// RestoreBestWeights, when false, leaves the last epoch's weights
	// (Keras's restore_best_weights=False); nil or true restores the
	// best epoch's.
	RestoreBestWeights *bool `json:"restore_best_weights,omitempty"`
}

// ModelCheckpoint saves the model as a package (Keras's ModelCheckpoint)
// after an epoch: every epoch, or with SaveBestOnly only when the
// monitored metric improved. Only Run (and what calls it: kiln train,
// Python's fit, Flight's train action) can save packages; Fit alone
// ignores it.
type ModelCheckpoint struct {
	// Path is the package directory; "{epoch}" in it becomes the epoch
	// number (1-based).
	Path string `json:"path"`
	// Monitor is a validation metric name (see EarlyStopping.Metric) or
	// train_loss; default loss (the validation loss).
	Monitor string `json:"monitor,omitempty"`
	// SaveBestOnly saves only when Monitor improved on every earlier
	// epoch.
	SaveBestOnly bool `json:"save_best_only,omitempty"`
}

// Config holds training's hyper-parameters.
type Config struct {
	Epochs    int       `json:"epochs"`
	BatchSize int       `json:"batch_size"`
	Seed      uint64    `json:"seed"`
	Loss      Loss      `json:"loss"`
	Optimizer Optimizer `json:"optimizer"`
	Schedule  Schedule  `json:"schedule,omitempty"`
	// ClipGradNorm clips the gradients' joint 2-norm (0: off).
	ClipGradNorm  float64        `json:"clip_grad_norm,omitempty"`
	EarlyStopping *EarlyStopping `json:"early_stopping,omitempty"`
	// ModelCheckpoint, when set, saves packages during training.
	ModelCheckpoint *ModelCheckpoint `json:"model_checkpoint,omitempty"`
	// ProgressEvery emits a step event every this many steps (default:
	// about 10 per epoch).
	ProgressEvery int `json:"progress_every,omitempty"`
	// CheckpointDir, when set, receives a checkpoint every
	// CheckpointEvery epochs (default 1); Resume continues from the
	// latest one there.
	CheckpointDir   string `json:"checkpoint_dir,omitempty"`
	CheckpointEvery int    `json:"checkpoint_every,omitempty"`
	Resume          bool   `json:"resume,omitempty"`
	// MaxSeconds, if > 0, ends training after the epoch during which it
	// passes (model selection's time budget).
	MaxSeconds float64 `json:"max_seconds,omitempty"`
	// Workers > 1 trains with that many data-parallel ranks in this
	// process (each with batch size BatchSize on its shard of the data),
	// joined by a Gloo group over loopback; see Group for one rank per
	// process (torchrun).
	Workers int `json:"workers,omitempty"`
	// Device is where training runs: "cpu" (or empty), "cuda" or
	// "cuda:N", as PyTorch names devices (core.CheckDevice). The network
	// moves there for Fit and back to the CPU afterwards; batches are
	// copied there once per epoch.
	Device string `json:"device,omitempty"`
	// AMP is mixed precision: "" or "none", "bf16" (CPU or CUDA) or "fp16"
	// (CUDA only): forward and loss run under autocast, as in
	// torch.autocast; parameters, gradients and the optimizer stay
	// float32.
	AMP string `json:"amp,omitempty"`
	// MemoryFormat is the layout of a convolutional network's tensors in
	// CPU training, with torch.memory_format's names: "" or
	// "channels_last" (the default: the 4-D weights, and 4-D batches, are
	// channels-last during each epoch, as model.to(memory_format=
	// torch.channels_last) does, so that oneDNN's convolutions and the
	// pooling kernels run without layout conversions; the values, and the
	// saved model's contiguous layout, are unchanged) or
	// "contiguous_format" (PyTorch's default layout throughout). Networks
	// without 4-D weights, CUDA and AMP training are not affected.
	MemoryFormat string `json:"memory_format,omitempty"`
	// Freeze, ParamGroups and FreezeBN fine-tune part of a network (any
	// TorchScript module: Job.Init, or one built from a spec): parameters
	// whose names start with a Freeze prefix stay fixed, ParamGroups give
	// per-prefix learning rates (see FineTuneConfig).
	Freeze      []string     `json:"freeze,omitempty"`
	ParamGroups []ParamGroup `json:"param_groups,omitempty"`
	FreezeBN    bool         `json:"freeze_bn,omitempty"`
	// SyncBatchNorm synchronizes batch-norm statistics across the ranks
	// of a data-parallel run (torch.nn.SyncBatchNorm): in training each
	// batch-norm layer normalizes with the mean and variance of every
	// rank's batch together, and the running statistics follow them.
	// Without it each rank uses its own batch's statistics (DDP's
	// default). No effect in a single process.
	SyncBatchNorm bool `json:"sync_batchnorm,omitempty"`
	// Group, when set, makes Fit one rank of a data-parallel run over it
	// (see core/dist and distributed.go); not part of the serialized
	// config.
	Group *dist.Group `json:"-"`
	// saveModel writes the network being trained as a package at path
	// (set by Run for ModelCheckpoint).
	saveModel func(path string, res *Result) error
}

// Validate checks the hyper-parameters without data (epochs, batch size,
// learning rate, loss, optimizer, schedule, early stopping, workers) with
// the defaults Run fills in for what c leaves out, as Fit does before it
// starts; the first problem is INVALID_ARGUMENT. A service checks a job
// with it before accepting it.
func (c Config) Validate() error {
	if err := c.withDefaults(data.Regression).validate(); err != nil {
		if core.CodeOf(err) != core.Unknown {
			return err // InvalidArgument, or a device's Unsupported/Unavailable
		}
		return core.Errorf(core.InvalidArgument, "%v", err)
	}
	return nil
}

// validate checks the hyper-parameters, stage by stage in this order, and
// returns the first error.
func (c Config) validate() error {
	for _, stage := range []func() error{
		c.validateEpochs,
		c.validateBatchSize,
		c.validateLR,
		c.validateLoss,
		c.validateOptimizerType,
		c.validateSchedule,
		c.validateEarlyStopping,
		c.validateModelCheckpoint,
		c.validateWorkers,
		c.validateDevice,
		c.validateAMP,
		c.validateMemoryFormat,
		c.validateFineTune,
	} {
		if err := stage(); err != nil {
			return err
		}
	}
	return nil
}

func (c Config) validateWorkers() error {
	if c.Workers < 0 || c.Workers > 256 {
		return core.Errorf(core.InvalidArgument, "kiln: train: workers must be in [0, 256], got %d", c.Workers)
	}
	if c.Workers > 1 && c.Group != nil {
		return core.Errorf(core.InvalidArgument, "kiln: train: workers=%d in a process that is already one rank of a distributed run (WORLD_SIZE=%d)", c.Workers, c.Group.Size())
	}
	return nil
}

// validateDevice checks the device against the linked libtorch and the
// machine (its error keeps core.CheckDevice's code: Unsupported without
// CUDA, Unavailable without the GPU).
func (c Config) validateDevice() error {
	if c.Device == "" || c.Device == core.CPU {
		return nil
	}
	if err := core.CheckDevice(c.Device); err != nil {
		return fmt.Errorf("kiln: train: %w", err)
	}
	if c.Workers > 1 || c.Group != nil {
		return core.Errorf(core.Unsupported, "kiln: train: device %s with data-parallel ranks: Kiln's process groups are Gloo over the CPU; train on one GPU, or on the CPU with workers", c.Device)
	}
	return nil
}

// amp returns the native mixed precision mode for c.AMP.
func (c Config) amp() (trainer.AMP, error) {
	switch norm(c.AMP) {
	case "", "none", "fp32":
		return trainer.AMPNone, nil
	case "bf16", "bfloat16":
		return trainer.AMPBF16, nil
	case "fp16", "float16", "half":
		return trainer.AMPFP16, nil
	}
	return 0, core.Errorf(core.InvalidArgument, "kiln: train: unknown amp %q (want none, bf16 or fp16)", c.AMP)
}

func (c Config) validateAMP() error {
	a, err := c.amp()
	if err != nil {
		return err
	}
	if a == trainer.AMPFP16 && (c.Device == "" || c.Device == core.CPU) {
		return core.Errorf(core.InvalidArgument, "kiln: train: amp fp16 needs a CUDA device (device %q); use bf16 on the CPU", cmp.Or(c.Device, core.CPU))
	}
	return nil
}

func (c Config) validateMemoryFormat() error {
	switch c.MemoryFormat {
	case "", "channels_last", "contiguous_format":
		return nil
	}
	return core.Errorf(core.InvalidArgument, "kiln: train: memory_format %q: use channels_last or contiguous_format", c.MemoryFormat)
}

func (c Config) validateEpochs() error {
	if c.Epochs <= 0 {
		return fmt.Errorf("kiln: train: epochs must be > 0, got %d", c.Epochs)
	}
	return nil
}

func (c Config) validateBatchSize() error {
	if c.BatchSize <= 0 {
		return fmt.Errorf("kiln: train: batch_size must be > 0, got %d", c.BatchSize)
	}
	return nil
}

// validateLR requires a positive learning rate (NaN fails).
func (c Config) validateLR() error {
	if !(c.Optimizer.LR > 0) {
		return fmt.Errorf("kiln: train: optimizer lr must be > 0, got %v", c.Optimizer.LR)
	}
	return nil
}

func (c Config) validateLoss() error {
	_, err := lossKind(c.Loss.Type)
	return err
}

func (c Config) validateOptimizerType() error {
	_, err := optKind(c.Optimizer.Type)
	return err
}

func (c Config) validateSchedule() error {
	switch norm(c.Schedule.Type) {
	case "", "none", "constant", "step", "cosine":
		return nil
	}
	return fmt.Errorf("kiln: train: unknown schedule %q (want step, cosine or none)", c.Schedule.Type)
}

// validateEarlyStopping, when early stopping is on, requires a patience and
// a known metric.
func (c Config) validateEarlyStopping() error {
	if c.EarlyStopping == nil {
		return nil
	}
	if c.EarlyStopping.Patience <= 0 {
		return fmt.Errorf("kiln: train: early_stopping patience must be > 0")
	}
	_, err := higherIsBetter(c.EarlyStopping.Metric)
	return err
}

// validateModelCheckpoint requires a path and a known monitor.
func (c Config) validateModelCheckpoint() error {
	mc := c.ModelCheckpoint
	if mc == nil {
		return nil
	}
	if strings.TrimSpace(mc.Path) == "" {
		return fmt.Errorf("kiln: train: model_checkpoint needs a path")
	}
	if mc.Monitor == "train_loss" {
		return nil
	}
	_, err := higherIsBetter(mc.Monitor)
	return err
}

func norm(s string) string {
	return strings.NewReplacer("-", "_", " ", "_").Replace(strings.ToLower(strings.TrimSpace(s)))
}

func lossKind(s string) (trainer.Loss, error) {
	switch norm(s) {
	case "mse":
		return trainer.LossMSE, nil
	case "l1", "mae":
		return trainer.LossL1, nil
	case "huber", "smooth_l1":
		return trainer.LossHuber, nil
	case "bce_with_logits", "bcewithlogits", "binary_cross_entropy_with_logits",
		"binary_crossentropy", "binary_cross_entropy":
		return trainer.LossBCEWithLogit, nil
	case "cross_entropy", "crossentropy", "ce",
		"categorical_crossentropy", "sparse_categorical_crossentropy",
		"categorical_cross_entropy", "sparse_categorical_cross_entropy":
		return trainer.LossCrossEntropy, nil
	}
	return 0, fmt.Errorf("kiln: train: unknown loss %q (want mse, l1, huber, bce_with_logits, cross_entropy, binary_crossentropy, categorical_crossentropy or sparse_categorical_crossentropy)", s)
}

func optKind(s string) (trainer.Optimizer, error) {
	switch norm(s) {
	case "sgd":
		return trainer.SGD, nil
	case "adam":
		return trainer.Adam, nil
	case "adamw":
		return trainer.AdamW, nil
	case "rmsprop":
		return trainer.RMSprop, nil
	}
	return 0, fmt.Errorf("kiln: train: unknown optimizer %q (want sgd, adam, adamw or rmsprop)", s)
}

// LR returns the learning rate at global step `step` (0-based) of a run of
// `epochs` epochs with stepsPerEpoch steps each.
func (c Config) LR(step, stepsPerEpoch int64) float64 {
	base := c.Optimizer.LR
	s := c.Schedule
	total := int64(c.Epochs) * stepsPerEpoch
	warm := int64(math.Round(s.WarmupEpochs * float64(stepsPerEpoch)))
	if warm > 0 && step < warm {
		return base * float64(step+1) / float64(warm)
	}
	switch norm(s.Type) {
	case "step":
		every := s.StepEpochs
		if every <= 0 {
			every = 10
		}
		g := s.Gamma
		if g == 0 {
			g = 0.1
		}
		epoch := step / stepsPerEpoch
		return base * math.Pow(g, float64(epoch/int64(every)))
	case "cosine":
		span := total - warm
		if span <= 0 {
			return base
		}
		t := float64(step-warm) / float64(span)
		return s.MinLR + (base-s.MinLR)*(1+math.Cos(math.Pi*t))/2
	}
	return base
}
