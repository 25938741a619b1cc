package optimize

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

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
	return measure(name, r, params, sparsity, scoreSet(sp), s.Manifest.Task, numClasses(s), false)
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
	if err := checkSparsity(o.Prune); err != nil {
		return nil, err
	}
	if o.Steps <= 0 {
		o.Steps = 1
	}
	if o.FineTuneLRScale <= 0 {
		o.FineTuneLRScale = 0.5
	}
	if o.Prune == 0 && o.Quantize == None {
		return nil, fmt.Errorf("kiln: optimize: nothing to do: give a pruning amount or a quantization")
	}
	if o.Quantize != None && o.Quantize != Int8 && o.Quantize != FP16 && o.Quantize != BF16 {
		return nil, fmt.Errorf("kiln: optimize: unknown quantization %q (want int8, fp16 or bf16)", o.Quantize)
	}
	if o.Quantize == Int8 {
		if _, err := ChooseEngine(o.Engine); err != nil {
			return nil, err
		}
	}
	if o.Calibration != nil {
		if o.Quantize != Int8 {
			return nil, fmt.Errorf("kiln: optimize: calibration data is for static int8 quantization, not %q", o.Quantize)
		}
		if err := checkCalibration(s, o.Calibration); err != nil {
			return nil, err
		}
	}
	if o.Weights != "" && o.Weights != PerChannel && o.Weights != PerTensor {
		return nil, fmt.Errorf("kiln: optimize: unknown weight scheme %q (want %s or %s)", o.Weights, PerChannel, PerTensor)
	}
	rec := &Record{Source: s.Dir, Options: o, Quantize: o.Quantize}
	var timed []*core.Module
	defer func() {
		for _, m := range timed {
			m.Close()
		}
	}()
	// Each stage starts only while ctx is live, so a cancelled run stops at
	// the next stage boundary (fine-tuning also stops between epochs).
	live := func() error {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("kiln: optimize: %w", err)
		}
		return nil
	}
	sparsity, err := netSparsity(s.Net, s.Manifest.Spec)
	if err != nil {
		return nil, err
	}
	before, err := measureModule(s, "fp32", s.Net.Module, s.Net.Params, sparsity, sp, &timed)
	if err != nil {
		return nil, err
	}
	rec.Before = before
	rec.Report.Variants = append(rec.Report.Variants, before)
	slog.Info("optimize: source", "file_bytes", before.FileBytes, "params", before.Params, before.Metric, before.Value)

	net, err := s.Cloned()
	if err != nil {
		return nil, err
	}
	defer func() { net.Close() }()
	spec := s.Manifest.Spec
	if o.Prune > 0 {
		cfg := s.Hyperparameters
		cfg.Epochs, cfg.CheckpointDir, cfg.CheckpointEvery, cfg.Resume, cfg.MaxSeconds = o.FineTuneEpochs, "", 0, false, 0
		cfg.Optimizer.LR *= o.FineTuneLRScale
		cfg.Schedule.WarmupEpochs = 0
		if cfg.EarlyStopping != nil && sp.Val == nil {
			cfg.EarlyStopping = nil
		}
		for step := 1; step <= o.Steps; step++ {
			if err := live(); err != nil {
				return nil, err
			}
			amount := o.Prune * float64(step) / float64(o.Steps)
			if o.Structured {
				// Each step prunes the original layer widths to the
				// step's amount: remove the right share of what is left.
				left := 1 - amount
				prev := 1 - o.Prune*float64(step-1)/float64(o.Steps)
				small, ns, err := PruneStructured(s, net, spec, 1-left/prev, o.Norm)
				if err != nil {
					return nil, err
				}
				net.Close()
				net, spec = small, ns
			} else {
				if _, err := PruneUnstructured(net, amount, o.Global); err != nil {
					return nil, err
				}
			}
			slog.Info("optimize: pruned", "step", step, "amount", amount, "params", net.Params)
			if o.FineTuneEpochs > 0 {
				res, err := train.Fit(ctx, net, sp.Train, sp.Val, cfg, nil)
				if err != nil {
					return nil, fmt.Errorf("kiln: optimize: fine-tuning: %w", err)
				}
				rec.FineTune = append(rec.FineTune, res)
				slog.Info("optimize: fine-tuned", "step", step, "best_epoch", res.BestEpoch, "val", res.Best)
			}
		}
		if !o.Structured && o.FineTuneEpochs > 0 {
			// Fine-tuning regrows pruned weights: prune back to the target.
			if _, err := PruneUnstructured(net, o.Prune, o.Global); err != nil {
				return nil, err
			}
		}
		if sparsity, err = netSparsity(net, spec); err != nil {
			return nil, err
		}
		name := fmt.Sprintf("pruned %.0f%%", 100*o.Prune)
		if o.Structured {
			name = fmt.Sprintf("pruned %.0f%% structured", 100*o.Prune)
		}
		v, err := measureModule(s, name, net.Module, net.Params, sparsity, sp, &timed)
		if err != nil {
			return nil, err
		}
		rec.Report.Variants = append(rec.Report.Variants, v)
		rec.After = v
	}
	if err := live(); err != nil {
		return nil, err
	}
	res := &Result{Record: rec, Spec: spec, Params: net.Params}
	if o.Quantize != None {
		var q *core.Module
		var engine string
		var err error
		name := o.Quantize
		if o.Quantize == Int8 && o.Calibration != nil {
			if engine, err = useEngine(o.Engine); err != nil {
				return nil, err
			}
			q, rec.Static, err = QuantizeStatic(s, net, spec, engine, o.Calibration, o.Weights)
			rec.Method = "static"
			name = "int8 static (" + engine + ")"
		} else {
			q, engine, err = Quantize(s, net, spec, o.Quantize, o.Engine)
			if o.Quantize == Int8 {
				rec.Method = "dynamic"
				name = "int8 dynamic (" + engine + ")"
			}
		}
		if err != nil {
			return nil, err
		}
		rec.Engine = engine
		if o.Prune > 0 {
			name = rec.After.Name + " + " + name
		}
		v, err := measureModule(s, name, q, net.Params, sparsity, sp, &timed)
		if err != nil {
			q.Close()
			return nil, err
		}
		rec.Report.Variants = append(rec.Report.Variants, v)
		rec.After = v
		res.Module = q
	} else {
		m, err := reload(net.Module)
		if err != nil {
			return nil, err
		}
		res.Module = m
	}
	err = live()
	if err == nil {
		err = timeVariants(rec, timed, sp)
	}
	if err != nil {
		res.Module.Close()
		return nil, err
	}
	return res, nil
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
		v, err := Score(res.Module, sp.Val, s.Manifest.Task, numClasses(s))
		if err != nil {
			return err
		}
		m.Metrics["val"] = v
	}
	if sp.Test != nil {
		v, err := Score(res.Module, sp.Test, s.Manifest.Task, numClasses(s))
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
