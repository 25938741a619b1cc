package train

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/dist"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/trainer"
)

// Event reports training progress: Kind "step" every Config.ProgressEvery
// steps, "epoch" after each epoch (with validation metrics), "done" at the
// end.
type Event struct {
	Kind   string
	Epoch  int // 1-based
	Epochs int
	Step   int64 // steps done in this epoch
	Steps  int64 // steps per epoch
	// Loss is the mean training loss so far in this epoch.
	Loss float64
	// LR is the current learning rate.
	LR float64
	// Metrics are the validation metrics (epoch and done events).
	Metrics Metrics
	// SamplesPerSec is the training throughput of this run so far.
	SamplesPerSec float64
	Elapsed       time.Duration
	// ETA is the estimated time left for the remaining epochs.
	ETA time.Duration
}

// EpochStats is the record of one epoch.
type EpochStats struct {
	Epoch     int     `json:"epoch"`
	TrainLoss float64 `json:"train_loss"`
	Val       Metrics `json:"val,omitempty"`
	LR        float64 `json:"lr"`
	Seconds   float64 `json:"seconds"`
}

// Result is what Fit did.
type Result struct {
	History []EpochStats `json:"history"`
	// BestEpoch is the epoch whose weights the network holds at the end
	// (the last one without early stopping); Best its validation metrics.
	BestEpoch int     `json:"best_epoch"`
	Best      Metrics `json:"best,omitempty"`
	// StopReason is "epochs", "early_stopping" or "time_budget".
	StopReason    string  `json:"stop_reason"`
	SamplesPerSec float64 `json:"samples_per_sec"`
	Seconds       float64 `json:"seconds"`
	// ResumedFrom is the epoch of the checkpoint training resumed from
	// (0: a fresh run).
	ResumedFrom int `json:"resumed_from,omitempty"`
}

// head is how outputs turn into predictions.
type head int

const (
	regression head = iota
	binary
	multiclass
)

func headOf(l trainer.Loss) head {
	switch l {
	case trainer.LossCrossEntropy:
		return multiclass
	case trainer.LossBCEWithLogit:
		return binary
	}
	return regression
}

func options(cfg Config) (trainer.Options, *core.Tensor, error) {
	lk, err := lossKind(cfg.Loss.Type)
	if err != nil {
		return trainer.Options{}, nil, err
	}
	ok, err := optKind(cfg.Optimizer.Type)
	if err != nil {
		return trainer.Options{}, nil, err
	}
	o := cfg.Optimizer
	opts := trainer.Options{
		Loss: lk, HuberDelta: cfg.Loss.HuberDelta, LabelSmoothing: cfg.Loss.LabelSmoothing,
		Optimizer: ok, LR: o.LR, Momentum: o.Momentum, Nesterov: o.Nesterov,
		WeightDecay: o.WeightDecay, Beta1: o.Beta1, Beta2: o.Beta2, Eps: o.Eps, Alpha: o.Alpha,
		ClipGradNorm: cfg.ClipGradNorm, ContiguousFormat: cfg.MemoryFormat == "contiguous_format",
	}
	if opts.AMP, err = cfg.amp(); err != nil {
		return trainer.Options{}, nil, err
	}
	if ok == trainer.AdamW && o.WeightDecay == 0 {
		opts.WeightDecay = 0.01 // PyTorch's AdamW default
	}
	var w *core.Tensor
	if len(cfg.Loss.ClassWeights) > 0 {
		if lk != trainer.LossCrossEntropy {
			return trainer.Options{}, nil, errors.New("kiln: train: class_weights apply to cross_entropy only")
		}
		v := make([]float32, len(cfg.Loss.ClassWeights))
		for i, x := range cfg.Loss.ClassWeights {
			v[i] = float32(x)
		}
		if w, err = core.NewTensor(v); err != nil {
			return trainer.Options{}, nil, err
		}
		opts.ClassWeights = w.Handle()
	}
	return opts, w, nil
}

// newTrainer makes a native trainer for net; the caller frees it.
func newTrainer(net *nn.Net, cfg Config) (trainer.Trainer, error) {
	opts, w, err := options(cfg)
	if err != nil {
		return trainer.Trainer{}, err
	}
	if w != nil {
		defer w.Close() // the trainer keeps its own copy
	}
	h := net.Handle()
	if !h.Valid() {
		return trainer.Trainer{}, fmt.Errorf("kiln: train: %w", core.ErrClosed)
	}
	if cfg.fineTunes() {
		tr, _, err := trainer.NewFineTuneTrainer(h, opts, cfg.fineTune())
		if err != nil {
			return trainer.Trainer{}, fmt.Errorf("kiln: train: %w", err)
		}
		return tr, nil
	}
	tr, err := trainer.NewTrainer(h, opts)
	if err != nil {
		return trainer.Trainer{}, fmt.Errorf("kiln: train: %w", err)
	}
	return tr, nil
}

// checkTargets verifies targets against the loss before any C call, so
// that errors name the problem.
func checkTargets(ds *data.Dataset, h head, outputs []int64, what string) error {
	k := int64(1)
	for _, d := range outputs {
		k *= d
	}
	switch h {
	case multiclass:
		if len(outputs) != 1 {
			return fmt.Errorf("kiln: train: cross_entropy needs a network with [classes] outputs, it has %v", outputs)
		}
		for i, y := range ds.Y {
			if y != float32(math.Trunc(float64(y))) || y < 0 || int64(y) >= k {
				return fmt.Errorf("kiln: train: %s row %d has class %v but the network has %d outputs", what, i, y, k)
			}
		}
	case binary:
		if k != 1 {
			return fmt.Errorf("kiln: train: bce_with_logits needs one output, the network has %v", outputs)
		}
		for i, y := range ds.Y {
			if y < 0 || y > 1 {
				return fmt.Errorf("kiln: train: %s row %d has target %v; bce_with_logits needs 0..1", what, i, y)
			}
		}
	default:
		if k != 1 {
			return fmt.Errorf("kiln: train: regression with one target column needs one output, the network has %v", outputs)
		}
	}
	return nil
}

// scoreOutputs computes metrics from the network's outputs.
func scoreOutputs(out native.Tensor, y []float32, h head) (Metrics, error) {
	t, err := core.AdoptTensor(out)
	if err != nil {
		return nil, err
	}
	defer t.Close()
	v, err := core.Data[float32](t)
	if err != nil {
		return nil, err
	}
	return scoreValues(v, y, h), nil
}

// scoreValues computes metrics from outputs v (row-major, len(y) rows).
func scoreValues(v []float32, y []float32, h head) Metrics {
	n := len(y)
	switch h {
	case multiclass:
		k := len(v) / n
		pred, truth := make([]int, n), make([]int, n)
		for i := range n {
			row := v[i*k : (i+1)*k]
			best := 0
			for c := range row {
				if row[c] > row[best] {
					best = c
				}
			}
			pred[i], truth[i] = best, int(y[i])
		}
		return ClassMetrics(pred, truth, k)
	case binary:
		pred, truth := make([]int, n), make([]int, n)
		for i := range n {
			if v[i] > 0 {
				pred[i] = 1
			}
			if y[i] >= 0.5 {
				truth[i] = 1
			}
		}
		return ClassMetrics(pred, truth, 2)
	}
	pred, truth := make([]float64, n), make([]float64, n)
	for i := range n {
		pred[i], truth[i] = float64(v[i]), float64(y[i])
	}
	return RegressionMetrics(pred, truth)
}

// evaluate runs the network over ds in eval mode and scores it.
func evaluate(tr trainer.Trainer, ds *data.Dataset, h head, batch int, net *nn.Net) (Metrics, error) {
	x, y, err := tensors(ds, net)
	if err != nil {
		return nil, err
	}
	defer x.Close()
	defer y.Close()
	out, loss, err := tr.Evaluate(x.Handle(), y.Handle(), int64(max(batch, 256)))
	if err != nil {
		return nil, fmt.Errorf("kiln: evaluate: %w", err)
	}
	m, err := scoreOutputs(out, ds.Y, h)
	if err != nil {
		return nil, err
	}
	m["loss"] = loss
	return m, nil
}

// Evaluate computes the loss and metrics of net on ds under cfg's loss.
func Evaluate(net *nn.Net, ds *data.Dataset, cfg Config) (Metrics, error) {
	if ds == nil || ds.Len() == 0 {
		return nil, errors.New("kiln: evaluate: the data set is empty")
	}
	lk, err := lossKind(cfg.Loss.Type)
	if err != nil {
		return nil, err
	}
	if err := checkTargets(ds, headOf(lk), net.Outputs, "evaluation"); err != nil {
		return nil, err
	}
	if cfg.Optimizer.LR <= 0 {
		cfg.Optimizer = Optimizer{Type: "sgd", LR: 1}
	}
	tr, err := newTrainer(net, cfg)
	if err != nil {
		return nil, err
	}
	defer tr.Free()
	return evaluate(tr, ds, headOf(lk), cfg.BatchSize, net)
}

// Fit trains net on trainSet, validating on valSet (may be nil) after
// every epoch. At the end net holds the best epoch's weights under early
// stopping, else the last epoch's, and is in eval mode. net must stay
// open during the call. onEvent (may be nil) receives progress on the
// calling goroutine. Cancelling ctx stops within one progress interval;
// Fit then returns ctx's error (and the checkpoints written so far).
// Fit seeds libtorch's default generator (dropout) with cfg.Seed and
// shuffles with its own generator seeded likewise; with one libtorch
// thread the same network, data and config give bit-identical weights.
func Fit(ctx context.Context, net *nn.Net, trainSet, valSet *data.Dataset, cfg Config, onEvent func(Event)) (res *Result, err error) {
	defer func() {
		if r := recover(); r != nil {
			res, err = nil, fmt.Errorf("kiln: train: internal error: %v", r)
		}
	}()
	valSet, h, err := checkFit(net, trainSet, valSet, cfg)
	if err != nil {
		return nil, err
	}
	if cfg.Workers > 1 && cfg.Group == nil {
		return fitWorkers(ctx, net, trainSet, valSet, cfg, onEvent)
	}
	if onEvent == nil {
		onEvent = func(Event) {}
	}
	if d := cfg.Device; d != "" && d != core.CPU {
		// The network trains on the device and comes back to the CPU,
		// where Kiln saves, serves and evaluates it.
		h := net.Handle()
		if err := h.To(d); err != nil {
			return nil, fmt.Errorf("kiln: train: move the network to %s: %w", d, err)
		}
		defer func() {
			if merr := h.To(core.CPU); merr != nil && err == nil {
				res, err = nil, fmt.Errorf("kiln: train: move the network back to the CPU: %w", merr)
			}
		}()
	}
	tr, err := newTrainer(net, cfg)
	if err != nil {
		return nil, err
	}
	defer tr.Free()
	x, y, err := tensors(trainSet, net)
	if err != nil {
		return nil, err
	}
	defer x.Close()
	defer y.Close()

	r := &run{cfg: cfg, net: net, tr: tr, h: h, res: &Result{StopReason: "epochs"},
		ctx: ctx, trainSet: trainSet, valSet: valSet, x: x, y: y, onEvent: onEvent, g: cfg.Group}
	defer r.freeBest()
	if r.g != nil {
		if err := r.joinGroup(); err != nil {
			return nil, err
		}
	}
	if err := r.begin(); err != nil {
		return nil, err
	}
	for epoch := r.start; epoch < cfg.Epochs; epoch++ {
		st, err := r.trainEpoch(epoch)
		if err != nil {
			return r.res, err
		}
		stop, err := r.endEpoch(epoch, st)
		if err != nil {
			return r.res, err
		}
		if stop {
			break
		}
	}
	return r.finish()
}

// checkFit rejects a config, data or network Fit cannot train, and returns
// the validation set to use (nil for an empty one) and the network's head.
func checkFit(net *nn.Net, trainSet, valSet *data.Dataset, cfg Config) (*data.Dataset, head, error) {
	if err := cfg.validate(); err != nil {
		return nil, 0, err
	}
	if trainSet == nil || trainSet.Len() == 0 {
		return nil, 0, errors.New("kiln: train: the training set is empty")
	}
	if int64(trainSet.Features) != net.Inputs {
		return nil, 0, fmt.Errorf("kiln: train: the data has %d feature columns but the network takes %d", trainSet.Features, net.Inputs)
	}
	if valSet != nil && valSet.Len() == 0 {
		valSet = nil
	}
	if cfg.EarlyStopping != nil && valSet == nil {
		return nil, 0, errors.New("kiln: train: early stopping needs a validation set")
	}
	lk, _ := lossKind(cfg.Loss.Type)
	h := headOf(lk)
	if act := fusedActivation(cfg.Loss.Type); act != "" && len(net.Layers) > 0 && net.Layers[len(net.Layers)-1].Type == act {
		return nil, 0, core.Errorf(core.InvalidArgument,
			"kiln: train: loss %s trains the network without its final %s (build it from TrainSpec), but this network ends in one", cfg.Loss.Type, act)
	}
	if err := checkTargets(trainSet, h, net.Outputs, "training"); err != nil {
		return nil, 0, err
	}
	if valSet != nil {
		if err := checkTargets(valSet, h, net.Outputs, "validation"); err != nil {
			return nil, 0, err
		}
	}
	return valSet, h, nil
}

// begin seeds the generators, resumes from the latest checkpoint when the
// config asks to, and works out the steps per epoch and the progress
// interval.
func (r *run) begin() error {
	cfg := r.cfg
	r.src = rand.NewPCG(cfg.Seed, 0x5eed)
	core.ManualSeed(cfg.Seed)
	if cfg.Resume && cfg.CheckpointDir != "" {
		start, err := r.resume()
		if err != nil {
			return err
		}
		r.start = start
	}
	r.rng = rand.New(r.src)
	if r.g != nil {
		if err := r.beginGroup(); err != nil {
			return err
		}
	}
	r.steps = trainer.EpochSteps(int64(r.shardLen()), int64(cfg.BatchSize))
	r.every = int64(cfg.ProgressEvery)
	if r.every <= 0 {
		r.every = max(1, r.steps/10)
	}
	r.t0 = time.Now()
	return nil
}

// trainEpoch trains one epoch (0-based) over a fresh shuffle and validates
// after it, returning the epoch's statistics.
func (r *run) trainEpoch(epoch int) (EpochStats, error) {
	if err := r.ctx.Err(); err != nil {
		return EpochStats{}, fmt.Errorf("kiln: train: %w", err)
	}
	e0 := time.Now()
	perm := r.shard(r.trainSet.Shuffle(r.rng))
	lrs := make([]float64, r.steps)
	for i := range lrs {
		lrs[i] = r.cfg.LR(int64(epoch)*r.steps+int64(i), r.steps)
	}
	er, err := r.tr.Epoch(r.x.Handle(), r.y.Handle(), perm, int64(r.cfg.BatchSize), lrs, r.every, r.progress(epoch, lrs))
	if err != nil {
		return EpochStats{}, fmt.Errorf("kiln: train: epoch %d: %w", epoch+1, r.explain(err))
	}
	if r.g != nil && !er.Stopped {
		// The epoch's loss over every rank's samples.
		v := []float64{er.LossSum, float64(er.Seen)}
		if err := r.g.AllReduce(v, trainer.ReduceSum); err != nil {
			return EpochStats{}, fmt.Errorf("kiln: train: epoch %d: %w", epoch+1, err)
		}
		er.LossSum, er.Seen = v[0], int64(v[1])
	}
	r.samples += er.Seen
	if er.Stopped {
		if err := r.ctx.Err(); err != nil {
			return EpochStats{}, fmt.Errorf("kiln: train: %w", err)
		}
		return EpochStats{}, errors.New("kiln: train: stopped by the progress callback")
	}
	st := EpochStats{Epoch: epoch + 1, TrainLoss: er.LossSum / float64(er.Seen), LR: lrs[len(lrs)-1]}
	if math.IsNaN(st.TrainLoss) || math.IsInf(st.TrainLoss, 0) {
		return EpochStats{}, fmt.Errorf("kiln: train: the training loss diverged (%v) in epoch %d; lower the learning rate or clip gradients", st.TrainLoss, epoch+1)
	}
	if r.g != nil {
		// Batch-norm running statistics: rank 0's, as DDP's broadcast_buffers.
		if err := r.g.Native().Broadcast(r.net.Handle(), true); err != nil {
			return EpochStats{}, fmt.Errorf("kiln: train: epoch %d: buffers: %w", epoch+1, r.explain(err))
		}
	}
	if r.valSet != nil {
		if r.g != nil {
			st.Val, err = r.evaluateGroup()
		} else {
			st.Val, err = evaluate(r.tr, r.valSet, r.h, r.cfg.BatchSize, r.net)
		}
		if err != nil {
			return EpochStats{}, err
		}
	}
	st.Seconds = time.Since(e0).Seconds()
	return st, nil
}

// progress is the trainer's progress callback for epoch (0-based), whose
// learning rates are lrs: it sends a "step" event, and stops the epoch
// once ctx is cancelled.
func (r *run) progress(epoch int, lrs []float64) func(step, nsteps int64, lossSum float64, seen int64) bool {
	ev := Event{Kind: "step", Epoch: epoch + 1, Epochs: r.cfg.Epochs, Steps: r.steps}
	n := int64(r.trainSet.Len())
	return func(step, nsteps int64, lossSum float64, seen int64) bool {
		if r.ctx.Err() != nil {
			return false
		}
		el := time.Since(r.t0)
		ev.Step, ev.Loss, ev.LR = step, lossSum/float64(seen), lrs[step-1]
		ev.Elapsed = el
		ev.SamplesPerSec = float64(r.samples+seen) / el.Seconds()
		left := float64(r.cfg.Epochs-epoch)*float64(n) - float64(seen)
		ev.ETA = time.Duration(left / ev.SamplesPerSec * float64(time.Second))
		r.onEvent(ev)
		return true
	}
}

// endEpoch records epoch's statistics, updates early stopping and the time
// budget, writes a checkpoint when one is due and sends the "epoch" event;
// true means training stops here.
func (r *run) endEpoch(epoch int, st EpochStats) (bool, error) {
	cfg := r.cfg
	r.res.History = append(r.res.History, st)
	stop, err := r.track(st)
	if err != nil {
		return false, err
	}
	if !stop && cfg.MaxSeconds > 0 && time.Since(r.t0).Seconds() >= cfg.MaxSeconds && epoch+1 < cfg.Epochs {
		stop, r.res.StopReason = true, "time_budget"
	}
	if r.g != nil {
		if stop, err = r.agreeStop(stop); err != nil {
			return false, err
		}
	}
	if err := r.modelCheckpoint(st); err != nil {
		return false, err
	}
	if cfg.CheckpointDir != "" && r.writes() {
		ce := max(cfg.CheckpointEvery, 1)
		if (epoch+1)%ce == 0 || epoch+1 == cfg.Epochs || stop {
			if err := r.checkpoint(epoch + 1); err != nil {
				return false, err
			}
		}
	}
	el := time.Since(r.t0)
	ev := Event{Kind: "epoch", Epoch: epoch + 1, Epochs: cfg.Epochs, Step: r.steps, Steps: r.steps,
		Loss: st.TrainLoss, LR: st.LR, Metrics: st.Val, Elapsed: el,
		SamplesPerSec: float64(r.samples) / el.Seconds()}
	ev.ETA = time.Duration(el.Seconds() / float64(epoch+1-r.start) * float64(cfg.Epochs-epoch-1) * float64(time.Second))
	r.onEvent(ev)
	slog.Debug("kiln: epoch", "epoch", epoch+1, "train_loss", st.TrainLoss, "val", st.Val)
	return stop, nil
}

// finish leaves the network with the best epoch's weights (under early
// stopping) in eval mode, completes the result and sends the "done" event.
func (r *run) finish() (*Result, error) {
	if r.best.Valid() {
		if err := trainer.CopyState(r.net.Handle(), r.best); err != nil {
			return r.res, fmt.Errorf("kiln: train: restoring the best epoch's weights: %w", err)
		}
	}
	if err := r.net.SetTraining(false); err != nil {
		return r.res, err
	}
	res := r.res
	res.Seconds = time.Since(r.t0).Seconds()
	if res.Seconds > 0 {
		res.SamplesPerSec = float64(r.samples) / res.Seconds
	}
	if res.BestEpoch == 0 && len(res.History) > 0 {
		last := res.History[len(res.History)-1]
		res.BestEpoch, res.Best = last.Epoch, last.Val
	}
	r.onEvent(Event{Kind: "done", Epoch: len(res.History) + res.ResumedFrom, Epochs: r.cfg.Epochs,
		Metrics: res.Best, Elapsed: time.Since(r.t0), SamplesPerSec: res.SamplesPerSec})
	return res, nil
}

// run is the state of one Fit call.
type run struct {
	cfg Config
	net *nn.Net
	tr  trainer.Trainer
	h   head
	src *rand.PCG
	res *Result
	// best holds a copy of the best epoch's weights (early stopping).
	best      native.Module
	bestValue float64
	bad       int

	ctx              context.Context
	trainSet, valSet *data.Dataset
	x, y             *core.Tensor
	onEvent          func(Event)
	// rng shuffles each epoch (drawing on src); start is the first epoch
	// to train (after a resume); steps the steps per epoch and every the
	// progress interval in steps.
	rng          *rand.Rand
	start        int
	steps, every int64
	// t0 is when training began; samples the rows trained on so far.
	t0      time.Time
	samples int64
	// g is the process group of a data-parallel run (nil: one process).
	g *dist.Group
	// ckBest is the best value ModelCheckpoint's monitor has had, ckSeen
	// whether it has had one.
	ckBest float64
	ckSeen bool
}

// modelCheckpoint saves a package after the epoch st when
// Config.ModelCheckpoint asks for one (on rank 0 of a group).
func (r *run) modelCheckpoint(st EpochStats) error {
	mc := r.cfg.ModelCheckpoint
	if mc == nil || r.cfg.saveModel == nil || !r.writes() {
		return nil
	}
	name := mc.Monitor
	if name == "" {
		name = "loss"
	}
	v, ok := st.TrainLoss, true
	if name != "train_loss" {
		v, ok = st.Val[name]
	}
	if !ok {
		return fmt.Errorf("kiln: train: model_checkpoint monitors %q, which this run does not compute (it has %v; without a validation split only train_loss)", name, keys(st.Val))
	}
	if mc.SaveBestOnly {
		up, _ := higherIsBetter(name)
		better := !r.ckSeen || (up && v > r.ckBest) || (!up && v < r.ckBest)
		if !better {
			return nil
		}
	}
	r.ckBest, r.ckSeen = v, true
	path := strings.ReplaceAll(mc.Path, "{epoch}", strconv.Itoa(st.Epoch))
	if err := r.cfg.saveModel(path, r.res); err != nil {
		return fmt.Errorf("kiln: train: model_checkpoint after epoch %d: %w", st.Epoch, err)
	}
	return r.net.SetTraining(true)
}

func (r *run) freeBest() {
	if r.best.Valid() {
		r.best.Free()
		r.best = native.Module{}
	}
}

// track updates early stopping after an epoch; true means stop.
func (r *run) track(st EpochStats) (bool, error) {
	es := r.cfg.EarlyStopping
	if es == nil {
		return false, nil
	}
	name := es.Metric
	if name == "" {
		name = "loss"
	}
	v, ok := st.Val[name]
	if !ok {
		return false, fmt.Errorf("kiln: train: early stopping monitors %q, which this task does not compute (it has %v)", name, keys(st.Val))
	}
	up, _ := higherIsBetter(name)
	better := r.res.BestEpoch == 0
	if !better {
		if up {
			better = v > r.bestValue+es.MinDelta
		} else {
			better = v < r.bestValue-es.MinDelta
		}
	}
	if better && es.RestoreBestWeights != nil && !*es.RestoreBestWeights {
		r.bestValue, r.bad = v, 0
		r.res.BestEpoch, r.res.Best = st.Epoch, st.Val
		return false, nil
	}
	if better {
		c, err := trainer.DeepCopy(r.net.Handle())
		if err != nil {
			return false, fmt.Errorf("kiln: train: keeping the best weights: %w", err)
		}
		r.freeBest()
		r.best, r.bestValue, r.bad = c, v, 0
		r.res.BestEpoch, r.res.Best = st.Epoch, st.Val
		return false, nil
	}
	r.bad++
	if r.bad >= es.Patience {
		r.res.StopReason = "early_stopping"
		return true, nil
	}
	return false, nil
}

func keys(m Metrics) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	return k
}
