package flightserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
)

// Trainer trains a model on a stored dataset. The Flight `train` action runs
// it in the background through a Jobs registry; Kiln's training engine
// implements it.
type Trainer interface {
	// Train runs one training job until it finishes or ctx is cancelled
	// (by the `cancel` action or a server shutdown), when it must return
	// promptly. spec is the action's JSON body, dataset the Arrow IPC file
	// of the dataset the spec names. Train reports its progress through
	// progress as often as it likes, and returns a JSON result (for
	// example the path of the model it wrote), or nil.
	Train(ctx context.Context, spec json.RawMessage, dataset string, progress func(Progress)) (json.RawMessage, error)
}

// TrainChecker is implemented by a Trainer that can tell, before a job
// starts, that a `train` body cannot succeed on a dataset: the action then
// fails with the error's code (INVALID_ARGUMENT, NOT_FOUND, ...) and no job
// is started.
type TrainChecker interface {
	// CheckTrain checks spec, the action's JSON body, against the stored
	// dataset it names; it must be quick (no training, no reading of the
	// data).
	CheckTrain(spec json.RawMessage, dataset DatasetInfo) error
}

// PipelineRunner starts the `pipeline_run` action's pipeline runs
// (serving gives one over package pipeline and the server's registry).
type PipelineRunner interface {
	// StartPipeline checks a pipeline file (YAML) before any work — an
	// error's code (INVALID_ARGUMENT, NOT_FOUND, ...) becomes the action's
	// status — and records its run; it returns the run's id and the
	// function that carries it out as a job.
	StartPipeline(ctx context.Context, yaml []byte) (runID string, run func(ctx context.Context, report func(Progress)) (json.RawMessage, error), err error)
}

// TrainerFunc adapts a function to the Trainer interface.
type TrainerFunc func(ctx context.Context, spec json.RawMessage, dataset string, progress func(Progress)) (json.RawMessage, error)

// Train calls f.
func (f TrainerFunc) Train(ctx context.Context, spec json.RawMessage, dataset string, progress func(Progress)) (json.RawMessage, error) {
	return f(ctx, spec, dataset, progress)
}

// Progress is a training job's progress, as its Trainer reports it.
type Progress struct {
	// Step is the number of units of work done (batches, epochs, ...).
	Step int64 `json:"step"`
	// Total is the number of units in all, or 0 when unknown.
	Total int64 `json:"total,omitempty"`
	// Message describes the current stage.
	Message string `json:"message,omitempty"`
	// Metrics holds the latest metrics (loss, accuracy, ...).
	Metrics map[string]float64 `json:"metrics,omitempty"`
	// RunID is the registry run recording the job, when the trainer
	// records one; the job status keeps the last one reported.
	RunID string `json:"run_id,omitempty"`
}

// Fraction returns Step/Total, or 0 when Total is unknown.
func (p Progress) Fraction() float64 {
	if p.Total <= 0 {
		return 0
	}
	return float64(p.Step) / float64(p.Total)
}

// Job states.
const (
	JobRunning   = "RUNNING"
	JobSucceeded = "SUCCEEDED"
	JobFailed    = "FAILED"
	JobCancelled = "CANCELLED"
)

// JobStatus is a snapshot of a training job, the JSON body of the
// `job-status` and `cancel` results.
type JobStatus struct {
	// ID identifies the job.
	ID string `json:"id"`
	// Dataset is the dataset the job trains on.
	Dataset string `json:"dataset"`
	// RunID is the registry run that records the job: a pipeline job's
	// (see the pipeline_run action), or a training job's on a server with
	// a registry, as the trainer reported it.
	RunID string `json:"run_id,omitempty"`
	// State is RUNNING, SUCCEEDED, FAILED or CANCELLED.
	State string `json:"state"`
	// Progress is the latest progress the trainer reported.
	Progress Progress `json:"progress"`
	// Fraction is Progress.Fraction(), 1 once the job succeeded.
	Fraction float64 `json:"fraction"`
	// Error says why a FAILED job failed.
	Error string `json:"error,omitempty"`
	// Result is what a SUCCEEDED job's trainer returned.
	Result json.RawMessage `json:"result,omitempty"`
	// Started and Finished are when the job started and ended.
	Started  time.Time  `json:"started"`
	Finished *time.Time `json:"finished,omitempty"`
}

// ErrJobNotFound is wrapped by errors about unknown job ids.
var ErrJobNotFound error = &core.Error{Code: core.NotFound, Message: "no such job"}

// job is one job of a registry.
type job struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu        sync.Mutex
	st        JobStatus
	cancelled bool
}

func (j *job) snapshot() JobStatus {
	j.mu.Lock()
	defer j.mu.Unlock()
	st := j.st
	st.Progress.Metrics = cloneMetrics(st.Progress.Metrics)
	return st
}

func cloneMetrics(m map[string]float64) map[string]float64 {
	if m == nil {
		return nil
	}
	c := make(map[string]float64, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// Jobs is a registry of training jobs running in the background with a
// Trainer. It is safe for concurrent use.
type Jobs struct {
	trainer Trainer

	mu     sync.Mutex
	jobs   map[string]*job
	closed bool
	wg     sync.WaitGroup
}

// NewJobs returns a registry whose jobs run trainer (nil: only jobs
// started with StartFunc).
func NewJobs(trainer Trainer) *Jobs {
	return &Jobs{trainer: trainer, jobs: map[string]*job{}}
}

func newJobID() string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("flight: reading random job id: %v", err))
	}
	return "job-" + hex.EncodeToString(b[:])
}

// Start starts a job training on the dataset named datasetName, whose file
// is datasetPath, with spec, and returns its id at once. The job runs until
// its trainer returns, Cancel, or Close; ctx only carries values to it (its
// cancellation does not end the job).
func (js *Jobs) Start(ctx context.Context, spec json.RawMessage, datasetName, datasetPath string) (string, error) {
	if js.trainer == nil {
		return "", errors.New("no trainer configured")
	}
	spec = append(json.RawMessage(nil), spec...)
	return js.StartFunc(ctx, datasetName, "", func(ctx context.Context, report func(Progress)) (json.RawMessage, error) {
		return runTrainer(ctx, js.trainer, spec, datasetPath, report)
	})
}

// StartFunc starts a job that runs f (a pipeline run, say) in the
// background and returns its id at once; dataset and runID are shown in
// its JobStatus. f reports progress through report, must return promptly
// when its context is cancelled (Cancel, Close), and a panic in it fails
// the job.
func (js *Jobs) StartFunc(ctx context.Context, dataset, runID string, f func(ctx context.Context, report func(Progress)) (json.RawMessage, error)) (string, error) {
	js.mu.Lock()
	defer js.mu.Unlock()
	if js.closed {
		return "", errors.New("the job registry is closed")
	}
	id := newJobID()
	jctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	j := &job{cancel: cancel, done: make(chan struct{}), st: JobStatus{ID: id, Dataset: dataset, RunID: runID, State: JobRunning, Started: time.Now().UTC()}}
	js.jobs[id] = j
	js.wg.Add(1)
	go func() {
		defer js.wg.Done()
		defer close(j.done)
		defer cancel()
		report := func(p Progress) {
			p.Metrics = cloneMetrics(p.Metrics)
			j.mu.Lock()
			j.st.Progress = p
			j.st.Fraction = p.Fraction()
			if p.RunID != "" {
				j.st.RunID = p.RunID
			}
			j.mu.Unlock()
		}
		res, err := runFunc(jctx, f, report)
		now := time.Now().UTC()
		j.mu.Lock()
		defer j.mu.Unlock()
		j.st.Finished = &now
		switch {
		case j.cancelled:
			j.st.State = JobCancelled
			if err != nil && !errors.Is(err, context.Canceled) {
				j.st.Error = err.Error()
			}
		case err != nil:
			j.st.State, j.st.Error = JobFailed, err.Error()
		default:
			j.st.State, j.st.Result, j.st.Fraction = JobSucceeded, res, 1
		}
	}()
	return id, nil
}

// runFunc calls f, turning a panic into the job's error.
func runFunc(ctx context.Context, f func(context.Context, func(Progress)) (json.RawMessage, error), report func(Progress)) (res json.RawMessage, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("job panicked: %v", p)
		}
	}()
	return f(ctx, report)
}

// runTrainer calls the trainer, turning a panic into the job's error.
func runTrainer(ctx context.Context, t Trainer, spec json.RawMessage, path string, report func(Progress)) (res json.RawMessage, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("trainer panicked: %v", p)
		}
	}()
	return t.Train(ctx, spec, path, report)
}

func (js *Jobs) get(id string) (*job, error) {
	js.mu.Lock()
	defer js.mu.Unlock()
	j, ok := js.jobs[id]
	if !ok {
		return nil, fmt.Errorf("job %q: %w", id, ErrJobNotFound)
	}
	return j, nil
}

// Status returns job id's status.
func (js *Jobs) Status(id string) (JobStatus, error) {
	j, err := js.get(id)
	if err != nil {
		return JobStatus{}, err
	}
	return j.snapshot(), nil
}

// Cancel asks job id to stop and returns its status then: a running job
// ends CANCELLED once its trainer returns (Wait waits for that); a finished
// job is left as it is.
func (js *Jobs) Cancel(id string) (JobStatus, error) {
	j, err := js.get(id)
	if err != nil {
		return JobStatus{}, err
	}
	j.mu.Lock()
	if j.st.State == JobRunning {
		j.cancelled = true
	}
	j.mu.Unlock()
	j.cancel()
	return j.snapshot(), nil
}

// Wait waits until job id has finished or ctx ends, and returns its status.
func (js *Jobs) Wait(ctx context.Context, id string) (JobStatus, error) {
	j, err := js.get(id)
	if err != nil {
		return JobStatus{}, err
	}
	select {
	case <-j.done:
		return j.snapshot(), nil
	case <-ctx.Done():
		return j.snapshot(), ctx.Err()
	}
}

// List returns every job's status, oldest first.
func (js *Jobs) List() []JobStatus {
	js.mu.Lock()
	all := make([]*job, 0, len(js.jobs))
	for _, j := range js.jobs {
		all = append(all, j)
	}
	js.mu.Unlock()
	out := make([]JobStatus, len(all))
	for i, j := range all {
		out[i] = j.snapshot()
	}
	sort.Slice(out, func(i, k int) bool {
		if !out[i].Started.Equal(out[k].Started) {
			return out[i].Started.Before(out[k].Started)
		}
		return out[i].ID < out[k].ID
	})
	return out
}

// Close cancels every running job and waits until all have returned.
func (js *Jobs) Close() {
	js.mu.Lock()
	js.closed = true
	for _, j := range js.jobs {
		j.mu.Lock()
		if j.st.State == JobRunning {
			j.cancelled = true
		}
		j.mu.Unlock()
		j.cancel()
	}
	js.mu.Unlock()
	js.wg.Wait()
}
