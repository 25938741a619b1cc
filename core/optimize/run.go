package optimize

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/native/trainer"
)

// Options says what Run does.
type Options struct {
	// Prune is the fraction of weights (unstructured) or of neurons
	// (Structured) to remove, in [0, 1); 0 prunes nothing.
	Prune      float64 `json:"prune,omitempty"`
	Structured bool    `json:"structured,omitempty"`
	// Global ranks all weights together (unstructured only).
	Global bool `json:"global,omitempty"`
	// Norm ranks neurons for structured pruning (default L2).
	Norm Norm `json:"norm,omitempty"`
	// Steps prunes in that many equal steps, fine-tuning after each
	// (default 1).
	Steps int `json:"steps,omitempty"`
	// FineTuneEpochs trains after each pruning step with the package's
	// hyper-parameters (learning rate times FineTuneLRScale, default 0.5);
	// 0 does not fine-tune.
	FineTuneEpochs  int     `json:"finetune_epochs,omitempty"`
	FineTuneLRScale float64 `json:"finetune_lr_scale,omitempty"`
	// Quantize is None, Int8, FP16 or BF16; Engine the quantized engine
	// for Int8 ("" chooses).
	Quantize string `json:"quantize,omitempty"`
	Engine   string `json:"engine,omitempty"`
	// Calibration, with Quantize Int8, makes it static int8: activation
	// ranges observed on these rows of raw model inputs (see
	// Source.Calibration); nil keeps int8 dynamic.
	Calibration *data.Dataset `json:"-"`
	// Weights is static int8's weight scheme: PerChannel (one scale per
	// output channel: more accurate), PerTensor (one per layer: smaller
	// files, by 16 bytes per output channel), or "" for the engine's
	// default as PyTorch's default qconfigs have it (qnnpack per tensor,
	// the others per channel).
	Weights string `json:"weights,omitempty"`
}

// Record is what an optimization did, kept in the manifest.
type Record struct {
	Source  string  `json:"source"`
	Options Options `json:"options"`
	// Engine is the quantized engine the int8 weights were packed for.
	Engine string `json:"engine,omitempty"`
	// Quantize repeats Options.Quantize (empty: float weights).
	Quantize string `json:"quantize,omitempty"`
	// Method is "dynamic" or "static" for int8.
	Method string `json:"method,omitempty"`
	// Static holds static int8's calibration and quantization parameters.
	Static *StaticInfo `json:"static,omitempty"`
	// FineTune holds each fine-tuning run's result.
	FineTune []*train.Result `json:"finetune,omitempty"`
	Before   Variant         `json:"before"`
	After    Variant         `json:"after"`
	// Report has every variant measured along the way.
	Report Report `json:"report"`
}

// Cloned returns a new network with src's spec and weights.
func (s *Source) Cloned() (*nn.Net, error) {
	n, err := nn.BuildWithPrelude(s.Manifest.Spec, s.Prelude, s.Manifest.Lineage.Seed)
	if err != nil {
		return nil, err
	}
	if err := trainer.CopyState(n.Handle(), s.Net.Handle()); err != nil {
		n.Close()
		return nil, fmt.Errorf("kiln: optimize: %w", err)
	}
	if err := n.SetTraining(false); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

// reload saves m and loads it back as a serving module (what the server
// and Python see); the caller closes it.
func reload(m *core.Module) (*core.Module, error) {
	dir, err := os.MkdirTemp("", "kiln-optimize-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	p := filepath.Join(dir, "model.pt")
	if err := m.SetTraining(false); err != nil {
		return nil, err
	}
	if err := m.Save(p); err != nil {
		return nil, err
	}
	return core.LoadModule(p)
}

func numClasses(s *Source) int { return len(s.Manifest.Labels) }

// probabilities reports whether s's outputs are probabilities (a package
// trained with a loss fused with its sigmoid or softmax) rather than
// logits.
func probabilities(s *Source) bool {
	return len(s.Manifest.Outputs) > 0 && strings.HasPrefix(s.Manifest.Outputs[0].Meaning, "probabilit")
}

// scoreSet is the split variants are measured on: test, else validation.
func scoreSet(sp *Splits) *data.Dataset {
	if sp.Test != nil {
		return sp.Test
	}
	return sp.Val
}

// measureModule reloads m and measures it on sp.Test (else sp.Val), all
// but latency: the reloaded module (what the server runs) joins *timed,
// whose modules timeVariants times together at the end of Run.
func measureModule(s *Source, name string, m *core.Module, params int64, sparsity float64, sp *Splits, timed *[]*core.Module) (Variant, error) {
	r, err := reload(m)
	if err != nil {
		return Variant{}, err
	}
	*timed = append(*timed, r)
	return measure(name, r, params, sparsity, scoreSet(sp), s.Manifest.Task, numClasses(s), probabilities(s), false)
}

// timeVariants sets the latencies of rec's report rows (and Before and
// After), timing their modules in alternation (Latencies) so that the
// speed-ups compare like with like.
func timeVariants(rec *Record, timed []*core.Module, sp *Splits) error {
	vs := rec.Report.Variants
	if len(timed) != len(vs) {
		return fmt.Errorf("kiln: optimize: %d variants but %d modules timed", len(vs), len(timed))
	}
	for _, batch := range []int{1, 64} {
		l, err := Latencies(timed, scoreSet(sp), batch)
		if err != nil {
			return err
		}
		for i := range vs {
			if batch == 1 {
				vs[i].LatencyB1 = l[i]
			} else {
				vs[i].LatencyB64 = l[i]
			}
		}
	}
	rec.Report.Threads = core.NumThreads()
	rec.Before = vs[0]
	rec.After = vs[len(vs)-1]
	return nil
}

func netSparsity(net *nn.Net, spec nn.Spec) (float64, error) {
	z, t, err := Sparsity(net, spec)
	if err != nil || t == 0 {
		return 0, err
	}
	return float64(z) / float64(t), nil
}

// Result is what Run produced.
type Result struct {
	Record *Record
	// Module is the optimized model (eval mode); Spec its float network's
	// spec. The caller closes Module.
	Module *core.Module
	Spec   nn.Spec
	Params int64
}

// Run optimizes the source model: prunes (and fine-tunes) as o says, then
// quantizes, measuring the model before and after each stage on the test
// split (the validation split without one).
func Run(ctx context.Context, s *Source, sp *Splits, o Options) (*Result, error) {
	o, err := checkOptions(s, o)
	if err != nil {
		return nil, err
	}
	r := &runner{ctx: ctx, s: s, sp: sp, o: o, rec: &Record{Source: s.Dir, Options: o, Quantize: o.Quantize}}
	defer r.close()
	if err := r.measureSource(); err != nil {
		return nil, err
	}
	if err := r.cloneSource(); err != nil {
		return nil, err
	}
	if o.Prune > 0 {
		if err := r.prune(); err != nil {
			return nil, err
		}
	}
	if err := r.live(); err != nil {
		return nil, err
	}
	m, err := r.finalModule()
	if err != nil {
		return nil, err
	}
	res := &Result{Record: r.rec, Module: m, Spec: r.spec, Params: r.net.Params}
	if err := r.timeAll(); err != nil {
		m.Close()
		return nil, err
	}
	return res, nil
}

// checkOptions rejects options Run cannot carry out on s and returns o
// with its defaults filled in (one step, fine-tuning at half the learning
// rate).
func checkOptions(s *Source, o Options) (Options, error) {
	if err := checkSparsity(o.Prune); err != nil {
		return o, err
	}
	if o.Steps <= 0 {
		o.Steps = 1
	}
	if o.FineTuneLRScale <= 0 {
		o.FineTuneLRScale = 0.5
	}
	if o.Prune == 0 && o.Quantize == None {
		return o, fmt.Errorf("kiln: optimize: nothing to do: give a pruning amount or a quantization")
	}
	if o.Quantize != None && o.Quantize != Int8 && o.Quantize != FP16 && o.Quantize != BF16 {
		return o, fmt.Errorf("kiln: optimize: unknown quantization %q (want int8, fp16 or bf16)", o.Quantize)
	}
	if o.Quantize == Int8 {
		if _, err := ChooseEngine(o.Engine); err != nil {
			return o, err
		}
	}
	if o.Calibration != nil {
		if o.Quantize != Int8 {
			return o, fmt.Errorf("kiln: optimize: calibration data is for static int8 quantization, not %q", o.Quantize)
		}
		if err := checkCalibration(s, o.Calibration); err != nil {
			return o, err
		}
	}
	if o.Weights != "" && o.Weights != PerChannel && o.Weights != PerTensor {
		return o, fmt.Errorf("kiln: optimize: unknown weight scheme %q (want %s or %s)", o.Weights, PerChannel, PerTensor)
	}
	return o, nil
}

// runner is the state of one Run: the network being optimized and what
// has been measured so far. Its methods are Run's stages, in order:
// measureSource, cloneSource, prune, finalModule (quantize), timeAll.
type runner struct {
	ctx context.Context
	s   *Source
	sp  *Splits
	o   Options
	rec *Record
	// net is the working copy of the source network and spec its spec
	// (smaller after structured pruning); sparsity its share of zero
	// weights.
	net      *nn.Net
	spec     nn.Spec
	sparsity float64
	// timed are the reloaded modules of the report's variants, in order,
	// which timeAll times together.
	timed []*core.Module
}

// close releases the working network and the timed modules.
func (r *runner) close() {
	if r.net != nil {
		r.net.Close()
	}
	for _, m := range r.timed {
		m.Close()
	}
}

// live returns the context's error once it is cancelled: each stage starts
// only while ctx is live, so a cancelled run stops at the next stage
// boundary (fine-tuning also stops between epochs).
func (r *runner) live() error {
	if err := r.ctx.Err(); err != nil {
		return fmt.Errorf("kiln: optimize: %w", err)
	}
	return nil
}

// measure measures m as the report's next variant.
func (r *runner) measure(name string, m *core.Module, params int64) (Variant, error) {
	v, err := measureModule(r.s, name, m, params, r.sparsity, r.sp, &r.timed)
	if err != nil {
		return Variant{}, err
	}
	r.rec.Report.Variants = append(r.rec.Report.Variants, v)
	return v, nil
}

// measureSource measures the source model as the record's Before.
func (r *runner) measureSource() error {
	s := r.s
	sparsity, err := netSparsity(s.Net, s.Manifest.Spec)
	if err != nil {
		return err
	}
	r.sparsity = sparsity
	before, err := r.measure("fp32", s.Net.Module, s.Net.Params)
	if err != nil {
		return err
	}
	r.rec.Before = before
	slog.Info("optimize: source", "file_bytes", before.FileBytes, "params", before.Params, before.Metric, before.Value)
	return nil
}

// cloneSource makes the working copy of the source network that the later
// stages change.
func (r *runner) cloneSource() error {
	net, err := r.s.Cloned()
	if err != nil {
		return err
	}
	r.net, r.spec = net, r.s.Manifest.Spec
	return nil
}

// fineTuneConfig is the source's training configuration for fine-tuning:
// o.FineTuneEpochs epochs at the scaled learning rate, without warm-up,
// checkpoints, a time budget or (without a validation split) early
// stopping.
func (r *runner) fineTuneConfig() train.Config {
	cfg := r.s.Hyperparameters
	cfg.Epochs, cfg.CheckpointDir, cfg.CheckpointEvery, cfg.Resume, cfg.MaxSeconds = r.o.FineTuneEpochs, "", 0, false, 0
	cfg.Optimizer.LR *= r.o.FineTuneLRScale
	cfg.Schedule.WarmupEpochs = 0
	if cfg.EarlyStopping != nil && r.sp.Val == nil {
		cfg.EarlyStopping = nil
	}
	return cfg
}

// prune prunes the working network to o.Prune in o.Steps steps, each
// followed by fine-tuning, and measures the pruned model.
func (r *runner) prune() error {
	o := r.o
	cfg := r.fineTuneConfig()
	for step := 1; step <= o.Steps; step++ {
		if err := r.live(); err != nil {
			return err
		}
		if err := r.pruneStep(step); err != nil {
			return err
		}
		if err := r.fineTune(step, cfg); err != nil {
			return err
		}
	}
	if !o.Structured && o.FineTuneEpochs > 0 {
		// Fine-tuning regrows pruned weights: prune back to the target.
		if _, err := PruneUnstructured(r.net, o.Prune, o.Global); err != nil {
			return err
		}
	}
	sparsity, err := netSparsity(r.net, r.spec)
	if err != nil {
		return err
	}
	r.sparsity = sparsity
	name := fmt.Sprintf("pruned %.0f%%", 100*o.Prune)
	if o.Structured {
		name = fmt.Sprintf("pruned %.0f%% structured", 100*o.Prune)
	}
	v, err := r.measure(name, r.net.Module, r.net.Params)
	if err != nil {
		return err
	}
	r.rec.After = v
	return nil
}

// pruneStep prunes the working network to step's share of o.Prune.
func (r *runner) pruneStep(step int) error {
	o := r.o
	amount := o.Prune * float64(step) / float64(o.Steps)
	if o.Structured {
		// Each step prunes the original layer widths to the step's amount:
		// remove the right share of what is left.
		left := 1 - amount
		prev := 1 - o.Prune*float64(step-1)/float64(o.Steps)
		small, ns, err := PruneStructured(r.s, r.net, r.spec, 1-left/prev, o.Norm)
		if err != nil {
			return err
		}
		r.net.Close()
		r.net, r.spec = small, ns
	} else {
		if _, err := PruneUnstructured(r.net, amount, o.Global); err != nil {
			return err
		}
	}
	slog.Info("optimize: pruned", "step", step, "amount", amount, "params", r.net.Params)
	return nil
}

// fineTune trains the working network after pruning step, when o asks for
// fine-tuning, and records the result.
func (r *runner) fineTune(step int, cfg train.Config) error {
	if r.o.FineTuneEpochs <= 0 {
		return nil
	}
	res, err := train.Fit(r.ctx, r.net, r.sp.Train, r.sp.Val, cfg, nil)
	if err != nil {
		return fmt.Errorf("kiln: optimize: fine-tuning: %w", err)
	}
	r.rec.FineTune = append(r.rec.FineTune, res)
	slog.Info("optimize: fine-tuned", "step", step, "best_epoch", res.BestEpoch, "val", res.Best)
	return nil
}

// finalModule is the optimized model the caller gets: the working network
// quantized as o says (and measured), or without quantization the working
// network reloaded as the server would load it.
func (r *runner) finalModule() (*core.Module, error) {
	if r.o.Quantize == None {
		return reload(r.net.Module)
	}
	q, name, err := r.quantize()
	if err != nil {
		return nil, err
	}
	if r.o.Prune > 0 {
		name = r.rec.After.Name + " + " + name
	}
	v, err := r.measure(name, q, r.net.Params)
	if err != nil {
		q.Close()
		return nil, err
	}
	r.rec.After = v
	return q, nil
}

// quantize quantizes the working network (static int8 with calibration
// data, else dynamic int8 or fp16/bf16 weights), noting the engine and
// method in the record; it returns the quantized module and its name in
// the report.
func (r *runner) quantize() (*core.Module, string, error) {
	o, rec := r.o, r.rec
	var q *core.Module
	var engine string
	var err error
	name := o.Quantize
	if o.Quantize == Int8 && o.Calibration != nil {
		if engine, err = useEngine(o.Engine); err != nil {
			return nil, "", err
		}
		q, rec.Static, err = QuantizeStatic(r.s, r.net, r.spec, engine, o.Calibration, o.Weights)
		rec.Method = "static"
		name = "int8 static (" + engine + ")"
	} else {
		q, engine, err = Quantize(r.s, r.net, r.spec, o.Quantize, o.Engine)
		if o.Quantize == Int8 {
			rec.Method = "dynamic"
			name = "int8 dynamic (" + engine + ")"
		}
	}
	if err != nil {
		return nil, "", err
	}
	rec.Engine = engine
	return q, name, nil
}

// timeAll times every measured variant together, once the run is still
// live, filling in the report's latencies.
func (r *runner) timeAll() error {
	if err := r.live(); err != nil {
		return err
	}
	return timeVariants(r.rec, r.timed, r.sp)
}

// SavePackage writes res as a Kiln model package in dir with
// modelpkg.Write: model.pt and manifest.json (the source's, with the new
// spec, parameter count, metrics on the splits and the optimization
// record).
func SavePackage(dir string, s *Source, sp *Splits, res *Result) error {
	m := s.Manifest
	rec, err := json.Marshal(res.Record)
	if err != nil {
		return fmt.Errorf("kiln: optimize: optimization record: %w", err)
	}
	m.Optimization = rec
	m.Spec = res.Spec
	m.Parameters = res.Params
	m.Metrics = map[string]map[string]float64{}
	if sp.Val != nil {
		v, err := ScoreOutputs(res.Module, sp.Val, s.Manifest.Task, numClasses(s), probabilities(s))
		if err != nil {
			return err
		}
		m.Metrics["val"] = v
	}
	if sp.Test != nil {
		v, err := ScoreOutputs(res.Module, sp.Test, s.Manifest.Task, numClasses(s), probabilities(s))
		if err != nil {
			return err
		}
		m.Metrics["test"] = v
	}
	if err := modelpkg.Write(dir, res.Module, m); err != nil {
		return fmt.Errorf("kiln: optimize: %w", err)
	}
	return nil
}
