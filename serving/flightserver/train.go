package flightserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/apache/arrow-go/v18/arrow/array"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/registry/runlog"
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
	// Workers > 1 trains data-parallel with that many ranks in the server
	// process (core/train Config.Workers), each with BatchSize.
	Workers int `json:"workers,omitempty"`
	// Device ("cpu", "cuda", "cuda:N") and AMP ("bf16", "fp16") override
	// the spec's train.device and train.amp (core/train Config); a GPU the
	// server lacks is refused before a job is made.
	Device string `json:"device,omitempty"`
	AMP    string `json:"amp,omitempty"`
	// SyncBatchNorm synchronizes batch-norm statistics across the workers
	// (core/train Config.SyncBatchNorm); overrides the spec when set.
	SyncBatchNorm bool `json:"sync_batchnorm,omitempty"`
	// MaxBatchSize is the max_batch_size of the config.yaml written for a
	// model the repository does not have yet (default 64).
	MaxBatchSize int `json:"max_batch_size,omitempty"`
	// Register, when set, registers the trained package as a new version
	// of this registered model in the server's registry (`kiln serve
	// --registry`; without one the action fails with FAILED_PRECONDITION).
	Register string `json:"register,omitempty"`
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
	// RunID is the registry run that recorded the job (with a server
	// registry).
	RunID string `json:"run_id,omitempty"`
	// Registered is the registry version made with TrainRequest.Register,
	// RegisteredDigest its artifact's SHA-256.
	Registered       *registry.Ref `json:"registered,omitempty"`
	RegisteredDigest string        `json:"registered_digest,omitempty"`
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
	// Registry, when set, records every job as a run (kind "train":
	// parameters, per-epoch metrics, final metrics, status, duration,
	// error) and lets requests register their result.
	Registry *registry.Registry
	// Actor is who the registry records as running the jobs (default
	// "flight").
	Actor string
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
	if req.Workers != 0 { // a negative count fails Config's validation
		t.Workers = req.Workers
	}
	if req.Device != "" {
		t.Device = req.Device
	}
	if req.AMP != "" {
		t.AMP = req.AMP
	}
	if req.SyncBatchNorm {
		t.SyncBatchNorm = true
	}
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
	if req.Register != "" {
		if err := registry.ValidModelName(req.Register); err != nil {
			return req, job, fmt.Errorf("train request: register: %w", err)
		}
	}
	return req, job, nil
}

// validModelName accepts the names the model repository serves
// (repository.ValidModelName), refusing hidden and path-like ones.
func validModelName(name string) error {
	if err := repository.ValidModelName(name); err != nil {
		return fmt.Errorf("model name: %w", err)
	}
	return nil
}

// CheckTrain implements TrainChecker: it checks a `train` body before a job
// starts, so that a request that cannot succeed fails the action itself
// (INVALID_ARGUMENT) instead of a job: the body and its spec parse
// (ParseTrainRequest: known fields, model layers, a target, no checkpoint
// options, a valid model name), and the target and feature columns exist
// in the dataset's schema with types training reads (arrowio.ReadTable's
// rules: numbers, booleans, strings, dictionaries of strings or integers).
func (t *ModelTrainer) CheckTrain(body json.RawMessage, dataset DatasetInfo) error {
	req, job, err := ParseTrainRequest(body)
	if err != nil {
		return core.Errorf(core.InvalidArgument, "%v", err)
	}
	if req.Register != "" && t.opts.Registry == nil {
		return core.Errorf(core.FailedPrecondition, "train request: register %q: the server has no registry (start it with kiln serve --registry)", req.Register)
	}
	// The network's layers and the hyper-parameters, as far as they can be
	// checked without the data's width.
	if err := job.Model.CheckLayers(); err != nil {
		return core.Errorf(core.InvalidArgument, "train request: %v", err)
	}
	if err := job.Train.Validate(); err != nil {
		if c := core.CodeOf(err); c == core.Unsupported || c == core.Unavailable {
			return fmt.Errorf("train request: %w", err) // a device this server lacks
		}
		return core.Errorf(core.InvalidArgument, "train request: %v", err)
	}
	if job.Train.Loss.Type != "" {
		// A Keras loss needs its activation last; a logits loss must not
		// follow one (a double sigmoid).
		if _, err := train.TrainSpec(job.Model, job.Train.Loss.Type); err != nil {
			return core.Errorf(core.InvalidArgument, "train request: %v", err)
		}
	}
	cols := []string(nil)
	if len(job.Data.Features) > 0 {
		cols = append(slices.Clone(job.Data.Features), job.Data.Target)
	}
	// The columns are converted as training will, on no rows.
	rdr, err := array.NewRecordReader(dataset.Schema, nil)
	if err != nil {
		return core.Errorf(core.InvalidArgument, "train request: dataset %q: %v", dataset.Name, err)
	}
	defer rdr.Release()
	tb, err := arrowio.TableFromRecords(rdr, cols)
	if err != nil {
		return core.Errorf(core.InvalidArgument, "train request: dataset %q: %v", dataset.Name, err)
	}
	if _, err := tb.Lookup(job.Data.Target, "target column"); err != nil {
		return core.Errorf(core.InvalidArgument, "train request: dataset %q: %v", dataset.Name, err)
	}
	return nil
}

// Train implements Trainer. With a registry (ModelTrainerOptions.Registry)
// the job is recorded as a run whose id the first progress report carries
// (Progress.RunID, so the job status shows it while it runs), and
// TrainRequest.Register registers the installed package.
func (t *ModelTrainer) Train(ctx context.Context, body json.RawMessage, dataset string, progress func(Progress)) (_ json.RawMessage, err error) {
	req, job, err := ParseTrainRequest(body)
	if err != nil {
		return nil, err
	}
	if req.Register != "" && t.opts.Registry == nil {
		return nil, core.Errorf(core.FailedPrecondition, "train request: register %q: the server has no registry (start it with kiln serve --registry)", req.Register)
	}
	var tr *runlog.Tracker
	if t.opts.Registry != nil {
		actor := t.opts.Actor
		if actor == "" {
			actor = "flight"
		}
		params := runlog.TrainParams(job, map[string]string{"dataset": req.Dataset, "model_repository_model": req.Model})
		if tr, err = runlog.Start(ctx, t.opts.Registry, runlog.KindTrain, params, runlog.Options{Model: req.Register, Actor: actor}); err != nil {
			return nil, fmt.Errorf("train: recording the run: %w", err)
		}
	}
	var final map[string]float64
	defer func() {
		if ferr := tr.Finish(err, final); ferr != nil && err == nil {
			err = fmt.Errorf("train: recording the run's end: %w", ferr)
		}
	}()
	runID := tr.ID()
	progress(Progress{Total: int64(max(job.Train.Epochs, 0)), Message: "reading dataset " + req.Dataset, RunID: runID})
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
	tmp, err := repository.NewStaging(t.opts.Repository, req.Model)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp) // gone after the rename; cleans up on failure
	onEvent := func(e train.Event) {
		p := Progress{Step: int64(e.Epoch - 1), Total: int64(e.Epochs), RunID: runID}
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
		tr.Epoch(e.Epoch, runlog.TrainEpoch(e))
	}
	rep, err := train.Run(ctx, job, tb, "flight dataset "+req.Dataset, tmp, onEvent)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	final = runlog.TrainFinal(rep)
	inst, err := repository.Install(t.opts.Repository, req.Model, tmp,
		repository.InstallOptions{MaxBatchSize: req.MaxBatchSize, Move: true})
	if err != nil {
		return nil, err
	}
	res := TrainResult{
		Model: req.Model, Version: inst.Version, Dir: inst.Dir, ConfigCreated: inst.ConfigCreated, RunID: runID,
		Task: string(inst.Manifest.Task), Labels: inst.Manifest.Labels, Val: rep.Val, Test: rep.Test,
		Epochs: len(rep.Result.History), BestEpoch: rep.Result.BestEpoch, StopReason: rep.Result.StopReason,
		Seconds: rep.Result.Seconds, SamplesPerSec: rep.Result.SamplesPerSec,
	}
	if req.Register != "" {
		v, err := tr.Register(ctx, req.Register, inst.Dir, nil)
		if err != nil {
			return nil, fmt.Errorf("train: %s version %d is installed, but registering it failed: %w", req.Model, inst.Version, err)
		}
		ref := v.Ref()
		res.Registered, res.RegisteredDigest = &ref, v.Digest
	}
	if t.opts.Load != nil {
		if err := t.opts.Load(req.Model); err != nil {
			res.LoadError = err.Error()
		} else {
			res.Loaded = true
		}
	}
	msg := fmt.Sprintf("wrote %s version %d", req.Model, res.Version)
	if res.Registered != nil {
		msg += ", registered " + res.Registered.String()
	}
	progress(Progress{Step: int64(res.Epochs), Total: int64(res.Epochs), Message: msg, Metrics: flatMetrics(rep), RunID: runID})
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

var (
	_ Trainer      = (*ModelTrainer)(nil)
	_ TrainChecker = (*ModelTrainer)(nil)
)
