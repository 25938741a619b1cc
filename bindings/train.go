package bindings

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"
	"unsafe"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/registry/runlog"
)

// TrainJob is a training run in a goroutine; Python polls it, so the GIL is
// free while Go trains and Ctrl-C can cancel it.
type TrainJob struct {
	cancel context.CancelFunc
	done   chan struct{}

	// runID is the registry run recording the job ("" when none).
	runID string

	mu     sync.Mutex
	events []train.Event
	report any // *train.Report or *train.Leaderboard
	err    error
}

// StartTraining copies rows×cols float32 features at xAddr and rows
// float32 targets at yAddr (numpy buffers, read during this call only) into
// a table with feature columns f0..f{cols-1} and target column "target",
// and trains the job described by jobJSON (a `kiln train` spec as JSON; its
// data.target is set to "target") in the background, writing the model
// package to outDir. recordJSON, when not "", records the job as a
// registry run (see recordSpec; RunID returns its id) as `kiln train`
// does (runlog).
func StartTraining(jobJSON string, xAddr uint64, rows, cols int, yAddr uint64, outDir, recordJSON string) (_ *TrainJob, err error) {
	defer guard(&err)
	j, err := train.ParseJob([]byte(jobJSON))
	if err != nil {
		return nil, err
	}
	j.Data.Target = "target"
	t, err := numpyTable(xAddr, rows, cols, yAddr)
	if err != nil {
		return nil, err
	}
	tr, err := startTracking(recordJSON, runlog.KindTrain, runlog.TrainParams(j, numpyParams(rows, cols)))
	if err != nil {
		return nil, err
	}
	return startJob(tr, func(ctx context.Context, onEvent func(train.Event)) (any, error) {
		rep, err := train.Run(ctx, j, t, "numpy", outDir, func(e train.Event) {
			onEvent(e)
			tr.Epoch(e.Epoch, runlog.TrainEpoch(e))
		})
		if err != nil {
			return nil, err
		}
		return rep, nil
	}, func(res any) map[string]float64 { return runlog.TrainFinal(res.(*train.Report)) }), nil
}

// numpyParams are the run parameters that say where a Python job's data
// came from.
func numpyParams(rows, cols int) map[string]string {
	return map[string]string{"data": "numpy", "rows": fmt.Sprint(rows), "features": fmt.Sprint(cols)}
}

// StartSelection runs model selection (a `kiln select` spec as JSON) over
// the same kind of numpy data as StartTraining, saving the winner's package
// to outDir; Report returns the leaderboard. recordJSON records the job
// as a registry run, as for StartTraining (`kiln select`'s shape).
func StartSelection(jobJSON string, xAddr uint64, rows, cols int, yAddr uint64, outDir, recordJSON string) (_ *TrainJob, err error) {
	defer guard(&err)
	j, err := train.ParseSelectJob([]byte(jobJSON))
	if err != nil {
		return nil, err
	}
	j.Data.Target = "target"
	t, err := numpyTable(xAddr, rows, cols, yAddr)
	if err != nil {
		return nil, err
	}
	tr, err := startTracking(recordJSON, runlog.KindSelect, runlog.SelectParams(j, numpyParams(rows, cols)))
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex // candidates train concurrently
	return startJob(tr, func(ctx context.Context, onEvent func(train.Event)) (any, error) {
		lb, err := train.Select(ctx, j, t, "numpy", outDir, func(name string, e train.Event) {
			mu.Lock()
			tr.Epoch(e.Epoch, runlog.SelectEpoch(name, e))
			mu.Unlock()
			if e.Kind == "done" {
				onEvent(e) // one event per finished candidate
			}
		})
		if err != nil {
			return nil, err
		}
		if _, winner := runlog.SelectFinal(lb); winner != nil {
			if err := tr.LogParams(ctx, winner); err != nil {
				return nil, err
			}
		}
		return lb, nil
	}, func(res any) map[string]float64 {
		final, _ := runlog.SelectFinal(res.(*train.Leaderboard))
		return final
	}), nil
}

// numpyTable copies numpy features and targets into a table.
func numpyTable(xAddr uint64, rows, cols int, yAddr uint64) (*data.Table, error) {
	if rows <= 0 || cols <= 0 {
		return nil, core.Errorf(core.InvalidArgument, "kiln: fit: need at least one row and one feature, got %d×%d", rows, cols)
	}
	x := unsafe.Slice((*float32)(native.AddrPointer(uintptr(xAddr))), rows*cols)
	y := unsafe.Slice((*float32)(native.AddrPointer(uintptr(yAddr))), rows)
	names := make([]string, cols+1)
	for c := range cols {
		names[c] = fmt.Sprintf("f%d", c)
	}
	names[cols] = "target"
	vals := make([]float64, rows*(cols+1))
	for r := range rows {
		row := vals[r*(cols+1) : (r+1)*(cols+1)]
		for c := range cols {
			row[c] = float64(x[r*cols+c])
		}
		row[cols] = float64(y[r])
	}
	return data.NewTable(names, vals)
}

// startJob runs work in a goroutine, collecting its events for Poll. With
// a tracker (nil: none) the run ends when work does: FINISHED with
// final(result) as its final metrics (final may be nil), FAILED with
// work's error, KILLED when cancelled; the tracker's registry is closed.
func startJob(tr *runlog.Tracker, work func(ctx context.Context, onEvent func(train.Event)) (any, error), final func(any) map[string]float64) *TrainJob {
	ctx, cancel := context.WithCancel(context.Background())
	job := &TrainJob{cancel: cancel, done: make(chan struct{}), runID: tr.ID()}
	go func() {
		defer close(job.done)
		res, err := runWork(ctx, work, func(e train.Event) {
			job.mu.Lock()
			job.events = append(job.events, e)
			job.mu.Unlock()
		})
		if tr != nil {
			var metrics map[string]float64
			if err == nil && final != nil && res != nil {
				metrics = final(res)
			}
			if ferr := tr.Finish(err, metrics); err == nil && ferr != nil {
				err = fmt.Errorf("kiln: recording the run's end: %w", ferr)
			}
			tr.Close()
		}
		job.mu.Lock()
		job.report, job.err = res, err
		job.mu.Unlock()
	}()
	return job
}

// runWork calls work, turning a panic into an Internal error.
func runWork(ctx context.Context, work func(ctx context.Context, onEvent func(train.Event)) (any, error), onEvent func(train.Event)) (res any, err error) {
	defer func() {
		if r := recover(); r != nil {
			res, err = nil, core.Errorf(core.Internal, "kiln: internal error: %v", r)
		}
	}()
	return work(ctx, onEvent)
}

// RunID returns the id of the registry run recording the job, or "".
func (j *TrainJob) RunID() string { return j.runID }

// eventJSON is one progress event for Python.
type eventJSON struct {
	Kind          string             `json:"kind"`
	Epoch         int                `json:"epoch"`
	Epochs        int                `json:"epochs"`
	Step          int64              `json:"step"`
	Steps         int64              `json:"steps"`
	Loss          float64            `json:"loss"`
	LR            float64            `json:"lr"`
	Metrics       map[string]float64 `json:"metrics,omitempty"`
	SamplesPerSec float64            `json:"samples_per_sec"`
	ETASeconds    float64            `json:"eta_s"`
}

// Poll waits up to timeoutMs for the job to finish and returns the progress
// events since the last Poll as a JSON list, and whether the job is done.
// The result is a JSON object {"done": bool, "events": [...]}.
func (j *TrainJob) Poll(timeoutMs int) string {
	select {
	case <-j.done:
	case <-time.After(time.Duration(timeoutMs) * time.Millisecond):
	}
	j.mu.Lock()
	evs := j.events
	j.events = nil
	j.mu.Unlock()
	out := struct {
		Done   bool        `json:"done"`
		Events []eventJSON `json:"events"`
	}{Events: []eventJSON{}}
	select {
	case <-j.done:
		out.Done = true
	default:
	}
	for _, e := range evs {
		out.Events = append(out.Events, eventJSON{e.Kind, e.Epoch, e.Epochs, e.Step, e.Steps, e.Loss, e.LR,
			e.Metrics, e.SamplesPerSec, e.ETA.Seconds()})
	}
	b, _ := json.Marshal(out)
	return string(b)
}

// Cancel stops the job; Report then returns its cancellation error.
func (j *TrainJob) Cancel() { j.cancel() }

// Report waits for the job and returns its report as JSON, or its error.
func (j *TrainJob) Report() (_ string, err error) {
	defer guard(&err)
	<-j.done
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.err != nil {
		return "", j.err
	}
	b, err := json.Marshal(j.report)
	return string(b), err
}

// SpecSummary validates the network spec specJSON (core/nn, JSON) for
// samples of `features` values and returns each layer's name, type, input
// and output shapes (per sample) and trainable parameter count as a JSON
// list, for Python's Model.summary. A spec that does not fit is
// INVALID_ARGUMENT.
func SpecSummary(specJSON string, features int) (_ string, err error) {
	defer guard(&err)
	s, err := nn.ParseSpec([]byte(specJSON))
	if err != nil {
		return "", err
	}
	infos, err := s.Infer(int64(features))
	if err != nil {
		return "", err
	}
	type layer struct {
		Name   string  `json:"name"`
		Type   string  `json:"type"`
		In     []int64 `json:"in"`
		Out    []int64 `json:"out"`
		Params int64   `json:"params"`
	}
	out := make([]layer, len(infos))
	for i, l := range infos {
		out[i] = layer{l.Name, l.Type, l.In, l.Out, l.Params}
	}
	b, err := json.Marshal(out)
	return string(b), err
}
