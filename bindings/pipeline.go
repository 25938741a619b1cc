package bindings

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/pipeline"
	"github.com/kilnml/kiln/registry"
)

// PipelineJob is a pipeline run (package pipeline, as `kiln pipeline run`)
// in a goroutine; Python polls it, so the GIL is free while it runs and
// Ctrl-C can cancel it.
type PipelineJob struct {
	cancel context.CancelFunc
	done   chan struct{}
	runID  string

	mu     sync.Mutex
	events []pipeline.Progress
	res    *pipeline.Result
	err    error
}

// pipelineOptions are StartPipeline's options (JSON, from kiln.pipeline_run).
type pipelineOptions struct {
	Registry  string `json:"registry"`
	Artifacts string `json:"registry_artifacts"`
	RunsDir   string `json:"runs_dir"`
	Resume    string `json:"resume"`
	Actor     string `json:"actor"`
}

// StartPipeline checks the pipeline file at path (errors come back before
// any work, as from `kiln pipeline run`), records its run (or reopens the
// interrupted run optionsJSON's "resume" names) and runs it in the
// background. optionsJSON: {"registry": DSN (default $KILN_REGISTRY, else
// $KILN_HOME/registry.db), "registry_artifacts": a directory or
// s3://bucket/prefix (default $KILN_REGISTRY_ARTIFACTS, else beside a
// SQLite file, $KILN_HOME/artifacts for PostgreSQL), "runs_dir": DIR
// (default $KILN_HOME/pipelines), "resume": RUN_ID, "actor": NAME}.
func StartPipeline(path, optionsJSON string) (_ *PipelineJob, err error) {
	defer guard(&err)
	var o pipelineOptions
	if optionsJSON != "" {
		if err := json.Unmarshal([]byte(optionsJSON), &o); err != nil {
			return nil, core.Errorf(core.InvalidArgument, "kiln: pipeline_run: options: %v", err)
		}
	}
	vars, err := kilnenv.Load(os.Getenv)
	if err != nil {
		return nil, err
	}
	home, err := vars.DataDir()
	if err != nil {
		return nil, err
	}
	if o.RunsDir == "" {
		o.RunsDir = filepath.Join(home, "pipelines")
	}
	dsn, artifacts, err := vars.RegistryLocation(o.Registry, o.Artifacts)
	if err != nil {
		return nil, err
	}
	key, err := registry.LoadKey(vars.RegistryKey, vars.RegistryKeyFile)
	if err != nil {
		return nil, err
	}
	if o.Actor == "" {
		o.Actor = "unknown"
		if u, err := user.Current(); err == nil && u.Username != "" {
			o.Actor = u.Username
		}
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, core.Errorf(core.NotFound, "kiln: pipeline_run: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	reg, err := registry.Open(ctx, dsn, registry.Options{ArtifactDir: artifacts, Key: key, S3PathStyle: vars.S3PathStyle})
	if err != nil {
		cancel()
		return nil, err
	}
	abs, _ := filepath.Abs(path)
	job := &PipelineJob{cancel: cancel, done: make(chan struct{})}
	opts := pipeline.Options{RunsDir: o.RunsDir, Registry: reg, Actor: o.Actor, BaseDir: filepath.Dir(abs),
		FlightToken: vars.AuthToken, Progress: func(p pipeline.Progress) {
			job.mu.Lock()
			job.events = append(job.events, p)
			job.mu.Unlock()
		}}
	var run *pipeline.Run
	if o.Resume != "" {
		run, err = pipeline.Resume(ctx, o.Resume, raw, opts)
	} else {
		run, err = pipeline.Start(ctx, raw, path, opts)
	}
	if err != nil {
		cancel()
		reg.Close()
		return nil, err
	}
	job.runID = run.ID()
	go func() {
		defer close(job.done)
		defer reg.Close()
		defer func() {
			if r := recover(); r != nil {
				job.mu.Lock()
				job.err = core.Errorf(core.Internal, "kiln: internal error: %v", r)
				job.mu.Unlock()
			}
		}()
		res, err := run.Execute(ctx)
		job.mu.Lock()
		job.res, job.err = res, err
		job.mu.Unlock()
	}()
	return job, nil
}

// RunID is the run's id (for kiln pipeline status and a resume).
func (j *PipelineJob) RunID() string { return j.runID }

// Poll waits up to timeoutMs for the run to finish and returns
// {"done": bool, "events": [progress...]} as JSON, the events being those
// since the last Poll.
func (j *PipelineJob) Poll(timeoutMs int) string {
	select {
	case <-j.done:
	case <-time.After(time.Duration(timeoutMs) * time.Millisecond):
	}
	j.mu.Lock()
	evs := j.events
	j.events = nil
	j.mu.Unlock()
	out := struct {
		Done   bool                `json:"done"`
		Events []pipeline.Progress `json:"events"`
	}{Events: append([]pipeline.Progress{}, evs...)}
	select {
	case <-j.done:
		out.Done = true
	default:
	}
	b, _ := json.Marshal(out)
	return string(b)
}

// Cancel stops the run (it ends KILLED); Report then returns the error.
func (j *PipelineJob) Cancel() { j.cancel() }

// Report waits for the run and returns its result (pipeline.Result) as
// JSON, or its error.
func (j *PipelineJob) Report() (_ string, err error) {
	defer guard(&err)
	<-j.done
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.err != nil {
		return "", j.err
	}
	b, err := json.Marshal(j.res)
	if err != nil {
		return "", fmt.Errorf("kiln: pipeline_run: %w", err)
	}
	return string(b), nil
}
