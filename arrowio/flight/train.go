package flight

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	yaml "go.yaml.in/yaml/v3"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/serving/repository"
)

// TrainRequest is the JSON body of the `train` action that ModelTrainer
// runs:
//
//	{"dataset": "iris", "model": "iris", "target": "species",
//	 "spec": {"model": {"layers": [...]}, "split": {...}, "train": {...}},
//	 "epochs": 50, "batch_size": 16, "optimizer": "adam", "lr": 0.01, "seed": 1}
//
// spec is a training spec as `kiln train --spec` reads it (core/train.Job:
// model, data, split and train sections), inline as a JSON object or as
// a JSON string of YAML or JSON text. The other fields override the
// spec's: target and features its data section, the hyper-parameters its
// train section.
type TrainRequest struct {
	// Dataset names the stored dataset (the server resolves it).
	Dataset string `json:"dataset"`
	// Model is the model repository's model the package is written to, as
	// its next version (default: the spec's model name, else the dataset's
	// name).
	Model string `json:"model,omitempty"`
	// Spec is the training spec.
	Spec json.RawMessage `json:"spec,omitempty"`
	// Target and Features override the spec's data.target and
	// data.features.
	Target   string   `json:"target,omitempty"`
	Features []string `json:"features,omitempty"`
	// Epochs, BatchSize, Optimizer (its type: sgd, adam, adamw, rmsprop),
	// LR and Seed override the spec's train section when set.
	Epochs    int     `json:"epochs,omitempty"`
	BatchSize int     `json:"batch_size,omitempty"`
	Optimizer string  `json:"optimizer,omitempty"`
	LR        float64 `json:"lr,omitempty"`
	Seed      *uint64 `json:"seed,omitempty"`
	// MaxBatchSize is the max_batch_size of the config.yaml written for a
	// model the repository does not have yet (default 64).
	MaxBatchSize int `json:"max_batch_size,omitempty"`
}

// TrainResult is the JSON result of a job that ModelTrainer ran.
type TrainResult struct {
	// Model and Version are the model repository's model and the version
	// written; Dir is the version's directory (model.pt, manifest.json).
	Model   string `json:"model"`
	Version int64  `json:"version"`
	Dir     string `json:"dir"`
	// ConfigCreated is set when the model's config.yaml was written by this
	// job (the model was new to the repository).
	ConfigCreated bool `json:"config_created,omitempty"`
	// Loaded is set when ModelTrainerOptions.Load loaded the version.
	Loaded bool `json:"loaded,omitempty"`
	// LoadError says why loading it failed (the package stays written).
	LoadError string `json:"load_error,omitempty"`
	// Task and Labels are what the model predicts.
	Task   string   `json:"task"`
	Labels []string `json:"labels,omitempty"`
	// Val and Test are the final network's metrics on those splits.
	Val  train.Metrics `json:"val,omitempty"`
	Test train.Metrics `json:"test,omitempty"`
	// Epochs, BestEpoch, StopReason, Seconds and SamplesPerSec summarize
	// the run.
	Epochs        int     `json:"epochs"`
	BestEpoch     int     `json:"best_epoch"`
	StopReason    string  `json:"stop_reason"`
	Seconds       float64 `json:"seconds"`
	SamplesPerSec float64 `json:"samples_per_sec"`
}

// ModelTrainerOptions configure a ModelTrainer.
type ModelTrainerOptions struct {
	// Repository is the model repository directory the packages are
	// written to (required; created if missing).
	Repository string
	// Load, when set, is called with the model's name once a new version
	// is in place, e.g. serving's manager.Manager.Load, so that the server
	// serves it at once (otherwise a polling server finds it, or a client
	// loads it explicitly).
	Load func(model string) error
}

// ModelTrainer is Kiln's Trainer: it reads the stored dataset into a
// table (arrowio.ReadTable), trains with core/train (split, preprocessing
// fitted on the training split, validation each epoch), and writes the
// model package as the next version <Repository>/<model>/<N+1>/ of the
// model repository, writing the model's config.yaml (inputs x [features],
// outputs y, with labels.txt for classes) when the model is new. The
// version directory appears whole: it is written under a hidden temporary
// name and renamed into place. Progress reports epochs (Step of Total)
// with the loss and validation metrics; a cancelled context stops training
// within one progress interval.
type ModelTrainer struct {
	opts ModelTrainerOptions
	mu   sync.Mutex // serializes version allocation and config writes
}

// NewModelTrainer returns a ModelTrainer writing into opts.Repository.
func NewModelTrainer(opts ModelTrainerOptions) (*ModelTrainer, error) {
	if opts.Repository == "" {
		return nil, errors.New("flight: model trainer: no model repository directory")
	}
	if err := os.MkdirAll(opts.Repository, 0o755); err != nil {
		return nil, fmt.Errorf("flight: model trainer: %w", err)
	}
	return &ModelTrainer{opts: opts}, nil
}

// ParseTrainRequest reads a `train` action body into the request and the
// training job it describes, with the overrides applied.
func ParseTrainRequest(body []byte) (TrainRequest, train.Job, error) {
	var req TrainRequest
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return req, train.Job{}, fmt.Errorf("train request: %w", err)
	}
	var job train.Job
	spec := req.Spec
	if len(spec) > 0 && spec[0] == '"' {
		var text string
		if err := json.Unmarshal(spec, &text); err != nil {
			return req, job, fmt.Errorf("train request: spec: %w", err)
		}
		spec = json.RawMessage(text)
	}
	if len(spec) > 0 && string(spec) != "null" {
		var err error
		if job, err = train.ParseJob(spec); err != nil {
			return req, job, fmt.Errorf("train request: %w", err)
		}
	}
	if len(job.Model.Layers) == 0 {
		return req, job, errors.New("train request: the spec has no model layers (spec.model.layers)")
	}
	if req.Target != "" {
		job.Data.Target = req.Target
	}
	if len(req.Features) > 0 {
		job.Data.Features = req.Features
	}
	if job.Data.Target == "" {
		return req, job, errors.New("train request: no target column (target, or spec.data.target)")
	}
	t := &job.Train
	if req.Epochs < 0 || req.BatchSize < 0 || req.LR < 0 {
		return req, job, errors.New("train request: epochs, batch_size and lr must not be negative")
	}
	if req.Epochs > 0 {
		t.Epochs = req.Epochs
	}
	if req.BatchSize > 0 {
		t.BatchSize = req.BatchSize
	}
	if req.Optimizer != "" {
		t.Optimizer.Type = req.Optimizer
	}
	if req.LR > 0 {
		t.Optimizer.LR = req.LR
	}
	if req.Seed != nil {
		t.Seed = *req.Seed
	}
	// A server-side job must not write or resume checkpoints where the
	// client says: the package is its only output.
	if t.CheckpointDir != "" || t.Resume {
		return req, job, errors.New("train request: checkpoint_dir and resume are not available through Flight")
	}
	if req.Model == "" {
		req.Model = job.Model.Name
	}
	if req.Model == "" {
		req.Model = req.Dataset
	}
	if err := validModelName(req.Model); err != nil {
		return req, job, fmt.Errorf("train request: %w", err)
	}
	if req.MaxBatchSize < 0 {
		return req, job, errors.New("train request: max_batch_size must not be negative")
	}
	return req, job, nil
}

// validModelName accepts the names the model repository serves (and
// ValidDatasetName's, a subset), refusing hidden and path-like ones.
func validModelName(name string) error {
	if err := ValidDatasetName(name); err != nil {
		return fmt.Errorf("model name: %w", err)
	}
	return nil
}

// Train implements Trainer.
func (t *ModelTrainer) Train(ctx context.Context, body json.RawMessage, dataset string, progress func(Progress)) (json.RawMessage, error) {
	req, job, err := ParseTrainRequest(body)
	if err != nil {
		return nil, err
	}
	progress(Progress{Total: int64(max(job.Train.Epochs, 0)), Message: "reading dataset " + req.Dataset})
	cols := []string(nil)
	if len(job.Data.Features) > 0 {
		cols = append(slices.Clone(job.Data.Features), job.Data.Target)
	}
	tb, err := arrowio.ReadTable(dataset, cols)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	modelDir := filepath.Join(t.opts.Repository, req.Model)
	if err := os.MkdirAll(modelDir, 0o755); err != nil {
		return nil, fmt.Errorf("model %q: %w", req.Model, err)
	}
	tmp, err := os.MkdirTemp(modelDir, ".training-")
	if err != nil {
		return nil, fmt.Errorf("model %q: %w", req.Model, err)
	}
	defer os.RemoveAll(tmp) // gone after the rename; left over on failure
	onEvent := func(e train.Event) {
		p := Progress{Step: int64(e.Epoch - 1), Total: int64(e.Epochs)}
		m := map[string]float64{"loss": e.Loss, "lr": e.LR, "samples_per_sec": e.SamplesPerSec}
		switch e.Kind {
		case "step":
			p.Message = fmt.Sprintf("epoch %d/%d step %d/%d", e.Epoch, e.Epochs, e.Step, e.Steps)
		case "epoch", "done":
			p.Step = int64(e.Epoch)
			p.Message = fmt.Sprintf("epoch %d/%d done", e.Epoch, e.Epochs)
			if e.Kind == "done" {
				p.Step, p.Message = p.Total, "trained; writing the model package"
			}
			for k, v := range e.Metrics {
				m["val_"+k] = v
			}
		}
		m["epoch"] = float64(e.Epoch)
		p.Metrics = m
		progress(p)
	}
	rep, err := train.Run(ctx, job, tb, "flight dataset "+req.Dataset, tmp, onEvent)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var man train.Manifest
	raw, err := os.ReadFile(filepath.Join(tmp, "manifest.json"))
	if err == nil {
		err = json.Unmarshal(raw, &man)
	}
	if err != nil {
		return nil, fmt.Errorf("reading the package's manifest: %w", err)
	}
	res := TrainResult{
		Model: req.Model, Task: string(man.Task), Labels: man.Labels, Val: rep.Val, Test: rep.Test,
		Epochs: len(rep.Result.History), BestEpoch: rep.Result.BestEpoch, StopReason: rep.Result.StopReason,
		Seconds: rep.Result.Seconds, SamplesPerSec: rep.Result.SamplesPerSec,
	}
	if res.Version, res.ConfigCreated, err = t.install(req, modelDir, tmp, &man); err != nil {
		return nil, fmt.Errorf("model %q: %w", req.Model, err)
	}
	res.Dir = filepath.Join(modelDir, strconv.FormatInt(res.Version, 10))
	if t.opts.Load != nil {
		if err := t.opts.Load(req.Model); err != nil {
			res.LoadError = err.Error()
		} else {
			res.Loaded = true
		}
	}
	progress(Progress{Step: int64(res.Epochs), Total: int64(res.Epochs), Message: fmt.Sprintf("wrote %s version %d", req.Model, res.Version), Metrics: flatMetrics(rep)})
	return json.Marshal(res)
}

// flatMetrics returns the final metrics as val_* and test_*.
func flatMetrics(rep *train.Report) map[string]float64 {
	m := map[string]float64{}
	for k, v := range rep.Val {
		m["val_"+k] = v
	}
	for k, v := range rep.Test {
		m["test_"+k] = v
	}
	return m
}

// install writes the model's config when it has none (or checks that the
// package fits the one it has) and renames the package at tmp to the next
// version directory.
func (t *ModelTrainer) install(req TrainRequest, modelDir, tmp string, man *train.Manifest) (int64, bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cfg, labels, err := packageConfig(req, man)
	if err != nil {
		return 0, false, err
	}
	created := false
	existing, cfgPath, err := readModelConfig(modelDir)
	switch {
	case err != nil:
		return 0, false, err
	case existing == nil:
		if labels != nil {
			if err := writeFileAtomic(filepath.Join(modelDir, "labels.txt"), []byte(strings.Join(labels, "\n")+"\n")); err != nil {
				return 0, false, err
			}
		}
		b, err := yaml.Marshal(cfg)
		if err != nil {
			return 0, false, err
		}
		if err := writeFileAtomic(filepath.Join(modelDir, "config.yaml"), b); err != nil {
			return 0, false, err
		}
		created = true
	default:
		if err := configFits(existing, cfg, filepath.Base(cfgPath)); err != nil {
			return 0, false, err
		}
		if err := sameLabels(modelDir, existing, labels); err != nil {
			return 0, false, err
		}
	}
	for {
		v, err := nextVersion(modelDir)
		if err != nil {
			return 0, false, err
		}
		dst := filepath.Join(modelDir, strconv.FormatInt(v, 10))
		err = os.Rename(tmp, dst)
		if err == nil {
			if d, err := os.Open(modelDir); err == nil {
				d.Sync()
				d.Close()
			}
			return v, created, nil
		}
		// Someone else took that version since nextVersion: try the next.
		if !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
			return 0, false, err
		}
	}
}

// packageConfig is the serving configuration of a model package: input x
// [features] and output y, FP32, with labels when there is one output
// value per class.
func packageConfig(req TrainRequest, man *train.Manifest) (*repository.Config, []string, error) {
	if len(man.Inputs) != 1 || len(man.Outputs) != 1 {
		return nil, nil, fmt.Errorf("package has %d inputs and %d outputs (want 1 and 1)", len(man.Inputs), len(man.Outputs))
	}
	in, out := man.Inputs[0], man.Outputs[0]
	if len(in.Shape) < 1 || len(out.Shape) < 1 || in.DType != "float32" || out.DType != "float32" {
		return nil, nil, fmt.Errorf("package input %v %s, output %v %s: want float32 with a batch dimension", in.Shape, in.DType, out.Shape, out.DType)
	}
	mbs := req.MaxBatchSize
	if mbs == 0 {
		mbs = 64
	}
	cfg := &repository.Config{
		Name:            req.Model,
		Platform:        repository.Platform,
		MaxBatchSize:    mbs,
		Inputs:          []repository.TensorSpec{{Name: in.Name, DataType: repository.FP32, Dims: slices.Clone(in.Shape[1:])}},
		Outputs:         []repository.TensorSpec{{Name: out.Name, DataType: repository.FP32, Dims: slices.Clone(out.Shape[1:])}},
		DynamicBatching: &repository.DynamicBatching{MaxQueueDelayUS: 500},
		VersionPolicy:   repository.VersionPolicy{Latest: 1},
	}
	var labels []string
	if len(man.Labels) > 0 && len(out.Shape) == 2 && out.Shape[1] == int64(len(man.Labels)) {
		labels = man.Labels
		cfg.Outputs[0].Labels = "labels.txt"
	}
	if err := cfg.Validate(); err != nil {
		return nil, nil, fmt.Errorf("generated config: %w", err)
	}
	return cfg, labels, nil
}

// readModelConfig returns the model's existing configuration, or nil when
// it has none.
func readModelConfig(dir string) (*repository.Config, string, error) {
	cfg, path, err := repository.ReadConfig(dir)
	if errors.Is(err, repository.ErrNoConfig) {
		return nil, "", nil
	}
	return cfg, path, err
}

// configFits checks that a package with configuration want can be a version of a
// model configured as have.
func configFits(have, want *repository.Config, file string) error {
	describe := func(ts []repository.TensorSpec) string {
		parts := make([]string, len(ts))
		for i, t := range ts {
			parts[i] = fmt.Sprintf("%s %s %v", t.Name, t.DataType, t.Dims)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	}
	same := func(a, b []repository.TensorSpec) bool {
		return slices.EqualFunc(a, b, func(x, y repository.TensorSpec) bool {
			return x.Name == y.Name && x.DataType == y.DataType && slices.Equal(x.Dims, y.Dims)
		})
	}
	if !same(have.Inputs, want.Inputs) || !same(have.Outputs, want.Outputs) || (have.MaxBatchSize == 0) != (want.MaxBatchSize == 0) {
		return fmt.Errorf("the trained package (inputs %s, outputs %s) does not fit the model's %s (inputs %s, outputs %s); train into a new model name",
			describe(want.Inputs), describe(want.Outputs), file, describe(have.Inputs), describe(have.Outputs))
	}
	return nil
}

// sameLabels checks that the labels file the model's config names, if
// any, lists the trained package's class labels.
func sameLabels(dir string, cfg *repository.Config, labels []string) error {
	for _, o := range cfg.Outputs {
		if o.Labels == "" || labels == nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(dir, o.Labels))
		if err != nil {
			return fmt.Errorf("output %q: labels: %w", o.Name, err)
		}
		var have []string
		for _, l := range strings.Split(string(raw), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				have = append(have, l)
			}
		}
		if !slices.Equal(have, labels) {
			return fmt.Errorf("output %q: the model's %s lists %v but the trained package's classes are %v; train into a new model name", o.Name, o.Labels, have, labels)
		}
	}
	return nil
}

// nextVersion returns one more than the highest version directory.
func nextVersion(dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var top int64
	for _, e := range ents {
		v, err := strconv.ParseInt(e.Name(), 10, 64)
		if err == nil && v > top && strconv.FormatInt(v, 10) == e.Name() {
			top = v
		}
	}
	return top + 1, nil
}

// writeFileAtomic writes b to path through a synced temporary file.
func writeFileAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

var _ Trainer = (*ModelTrainer)(nil)

// Install copies the Kiln model package in pkgDir (model.pt and
// manifest.json, as core/train writes it) into the model repository as the
// next version of model, writing the model's config.yaml (and labels.txt)
// when it has none, exactly as the train action does; it returns the
// version. Python's Model.deploy uses it.
func (t *ModelTrainer) Install(pkgDir, model string) (int64, error) {
	raw, err := os.ReadFile(filepath.Join(pkgDir, "manifest.json"))
	if err != nil {
		return 0, fmt.Errorf("install %s: %w", pkgDir, err)
	}
	var man train.Manifest
	if err := json.Unmarshal(raw, &man); err != nil {
		return 0, fmt.Errorf("install %s: manifest.json: %w", pkgDir, err)
	}
	req := TrainRequest{Model: model}
	if err := validModelName(model); err != nil {
		return 0, err
	}
	modelDir := filepath.Join(t.opts.Repository, model)
	if err := os.MkdirAll(modelDir, 0o755); err != nil {
		return 0, fmt.Errorf("model %q: %w", model, err)
	}
	tmp, err := os.MkdirTemp(modelDir, ".installing-")
	if err != nil {
		return 0, fmt.Errorf("model %q: %w", model, err)
	}
	defer os.RemoveAll(tmp) // gone after the rename; cleans up on error
	for _, f := range []string{"model.pt", "manifest.json"} {
		b, err := os.ReadFile(filepath.Join(pkgDir, f))
		if err != nil {
			return 0, fmt.Errorf("install %s: %w", pkgDir, err)
		}
		if err := writeFileAtomic(filepath.Join(tmp, f), b); err != nil {
			return 0, err
		}
	}
	v, _, err := t.install(req, modelDir, tmp, &man)
	return v, err
}
