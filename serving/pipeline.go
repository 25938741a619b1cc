package serving

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/pipeline"
	"github.com/kilnml/kiln/serving/flightserver"
)

// DefaultPipelineDebounce is the quiet time after a dataset commit before
// continuous training runs the pipeline.
const DefaultPipelineDebounce = 30 * time.Second

// pipelines runs pipelines for the server: Flight's pipeline_run action
// and continuous training (Config.Pipeline on Config.WatchDataset).
type pipelines struct {
	s       *Server
	runsDir string
	// file, raw and watch: continuous training's pipeline file and dataset
	// (raw == nil: none).
	file    string
	raw     []byte
	watch   string
	trigger *pipeline.Trigger
}

// newPipelines checks Config.Pipeline (parsed strictly: a bad file stops
// the server from starting) and prepares the runner.
func (s *Server) newPipelines() (*pipelines, error) {
	p := &pipelines{s: s, runsDir: s.cfg.pipelineRuns}
	if p.runsDir == "" {
		vars, err := kilnenv.Load(os.Getenv)
		if err != nil {
			return nil, err
		}
		home, err := vars.DataDir()
		if err != nil {
			return nil, fmt.Errorf("pipeline runs directory: %w", err)
		}
		p.runsDir = filepath.Join(home, "pipelines")
	}
	if s.cfg.Pipeline == "" {
		return p, nil
	}
	raw, err := os.ReadFile(s.cfg.Pipeline)
	if err != nil {
		return nil, fmt.Errorf("--pipeline: %w", err)
	}
	spec, err := pipeline.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("--pipeline %s: %w", s.cfg.Pipeline, err)
	}
	p.file, p.raw, p.watch = s.cfg.Pipeline, raw, s.cfg.WatchDataset
	if p.watch == "" {
		p.watch = spec.Data.Dataset
	}
	if p.watch == "" {
		return nil, fmt.Errorf("--pipeline %s: its data is not a dataset of this server's store (data.dataset): name the dataset to watch with --watch-dataset", s.cfg.Pipeline)
	}
	if err := flightserver.ValidDatasetName(p.watch); err != nil {
		return nil, fmt.Errorf("--watch-dataset: %w", err)
	}
	debounce := s.cfg.PipelineDebounce
	if debounce == 0 {
		debounce = DefaultPipelineDebounce
	}
	p.trigger = pipeline.NewTrigger(debounce, p.continuous)
	return p, nil
}

// committed is Flight's OnDatasetCommitted: a commit of the watched
// dataset notifies the trigger.
func (p *pipelines) committed(info flightserver.DatasetInfo) {
	if p.trigger != nil && info.Name == p.watch {
		p.s.log.Info("pipeline: watched dataset committed; a run follows the debounce", "dataset", info.Name, "rows", info.Rows,
			"debounce", p.s.cfg.PipelineDebounce)
		p.trigger.Notify()
	}
}

func (p *pipelines) options(override string) pipeline.Options {
	abs, _ := filepath.Abs(p.file)
	o := pipeline.Options{RunsDir: p.runsDir, Registry: p.s.registry, Actor: "kiln serve", Logger: p.s.log,
		Datasets: p.dataset, DatasetOverride: override}
	if p.file != "" {
		o.BaseDir = filepath.Dir(abs)
	}
	return o
}

// dataset resolves data.dataset in this server's store.
func (p *pipelines) dataset(name string) (string, error) {
	if p.s.flight == nil {
		return "", errors.New("this server has no Flight service, so no dataset store")
	}
	info, err := p.s.flight.Dataset(name)
	if errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("dataset %q is not in this server's store", name)
	}
	if err != nil {
		return "", err
	}
	return info.Path, nil
}

// continuous runs the pipeline on the watched dataset (the trigger calls
// it, one at a time); a failure is logged (and recorded by the run), never
// more.
func (p *pipelines) continuous(ctx context.Context) {
	defer func() {
		if r := recover(); r != nil {
			p.s.log.Error("pipeline: continuous training panicked; the server goes on", "panic", r)
		}
	}()
	run, err := pipeline.Start(ctx, p.raw, p.file, p.options(p.watch))
	if err != nil {
		p.s.log.Error("pipeline: continuous training cannot start; the server goes on", "pipeline", p.file, "dataset", p.watch, "err", err)
		return
	}
	p.s.log.Info("pipeline: continuous training run", "run", run.ID(), "dataset", p.watch)
	if _, err := run.Execute(ctx); err != nil {
		p.s.log.Error("pipeline: continuous training run failed; the server goes on", "run", run.ID(), "err", err)
	}
}

// StartPipeline is Flight's PipelineRunner: the body is a pipeline file,
// checked before a job starts.
func (p *pipelines) StartPipeline(ctx context.Context, yaml []byte) (string, func(context.Context, func(flightserver.Progress)) (json.RawMessage, error), error) {
	o := p.options("")
	o.BaseDir = ""
	run, err := pipeline.Start(ctx, yaml, "flight:pipeline_run", o)
	if err != nil {
		return "", nil, err
	}
	f := func(ctx context.Context, report func(flightserver.Progress)) (json.RawMessage, error) {
		res, err := run.ExecuteWithProgress(ctx, func(pr pipeline.Progress) {
			report(flightserver.Progress{Step: int64(pr.Index), Total: int64(pr.Stages), Message: pr.Stage + ": " + pr.Message, Metrics: pr.Metrics})
		})
		if err != nil {
			return nil, err
		}
		return json.Marshal(res)
	}
	return run.ID(), f, nil
}

func (p *pipelines) close() {
	if p != nil && p.trigger != nil {
		p.trigger.Close()
	}
}
