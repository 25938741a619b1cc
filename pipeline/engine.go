package pipeline

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/registry"
)

// Options configure a pipeline run.
type Options struct {
	// RunsDir holds the run directories, RUNS_DIR/RUN_ID (required;
	// kiln uses $KILN_HOME/pipelines).
	RunsDir string
	// Registry records the run, the versions and the verdict, and holds
	// the alias (required).
	Registry *registry.Registry
	// Actor is who runs it (recorded with runs, versions and alias moves).
	Actor string
	// BaseDir is the directory relative data paths are read from (the
	// pipeline file's; "" is the working directory).
	BaseDir string
	// Datasets resolves data.dataset (a serving process's own store); nil
	// refuses data.dataset.
	Datasets DatasetStore
	// DatasetOverride, when not empty, replaces the file's data source by
	// this dataset of Datasets (continuous training runs the pipeline on
	// the dataset it watches).
	DatasetOverride string
	// FlightToken is the bearer token sent to a data.flight server.
	FlightToken string
	// Logger receives a line per stage and per epoch (default
	// slog.Default()).
	Logger *slog.Logger
	// Progress, when not nil, receives the same progress as values.
	Progress func(Progress)
}

// Progress is one step of a run: a stage starting or ending, or an epoch.
type Progress struct {
	RunID string `json:"run_id"`
	Stage string `json:"stage"`
	// Index is the stage's place (1-based) among Stages.
	Index   int                `json:"index"`
	Stages  int                `json:"stages"`
	Message string             `json:"message"`
	Epoch   int                `json:"epoch,omitempty"`
	Epochs  int                `json:"epochs,omitempty"`
	Metrics map[string]float64 `json:"metrics,omitempty"`
}

// Result is what a finished run did.
type Result struct {
	RunID string `json:"run_id"`
	Model string `json:"model"`
	// Trained is the registered version of the trained (selected) model;
	// Candidate the version evaluated and promoted or not (the optimized
	// variant, whose parent is Trained, or Trained itself).
	Trained   registry.Ref `json:"trained"`
	Candidate registry.Ref `json:"candidate"`
	// Verdict is PROMOTE, HOLD or REJECT; First says the model had no
	// version at Alias, so the candidate was promoted without a
	// comparison.
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
	First   bool   `json:"first,omitempty"`
	// Alias, its version before (Baseline, 0: none) and after the run.
	Alias    string `json:"alias"`
	Baseline int    `json:"baseline,omitempty"`
	Serving  int    `json:"serving,omitempty"`
	Promoted bool   `json:"promoted"`
	// EvaluationID is the registry's record of the verdict.
	EvaluationID int64 `json:"evaluation_id,omitempty"`
}

// Run is a pipeline run, started or resumed, that Execute carries out.
type Run struct {
	eng *engine
}

// ID is the run's id (the registry run's).
func (r *Run) ID() string { return r.eng.state.RunID }

// Dir is the run's directory.
func (r *Run) Dir() string { return r.eng.dir }

// Spec is the parsed pipeline file.
func (r *Run) Spec() *Spec { return r.eng.spec }

// Close releases the run's lock (Execute does when it returns).
func (r *Run) Close() { r.eng.lock.release() }

// engine is one run's state while a process carries it out.
type engine struct {
	spec    *Spec
	raw     []byte
	opts    Options
	log     *slog.Logger
	reg     *registry.Registry
	dir     string
	state   *State
	lock    *runLock
	current string // the stage running, for Progress

	// outputs of the stages, read back from the state on resume
	data     *dataOut
	prep     *prepOut
	trained  *trainOut
	opt      *optimizeOut
	eval     *evaluateOut
	register *registerOut
	promote  *promoteOut

	tables *tables
}

func digest(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func (o *Options) check() error {
	if o.RunsDir == "" {
		return errors.New("kiln: pipeline: no runs directory")
	}
	if o.Registry == nil {
		return errors.New("kiln: pipeline: no registry")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return nil
}

// Start checks a pipeline file before any work — the file itself (Parse),
// the data's columns against the target, the features and the input
// columns of the model the alias names — then records the run in the
// registry (kind "pipeline") and creates its directory. source names the
// file (for the record). Execute then runs it.
func Start(ctx context.Context, raw []byte, source string, o Options) (*Run, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	spec, err := Parse(raw)
	if err != nil {
		if source != "" {
			return nil, fmt.Errorf("%w (in %s)", err, source)
		}
		return nil, err
	}
	e := &engine{spec: spec, raw: raw, opts: o, log: o.Logger, reg: o.Registry}
	e.applyOverride()
	if err := e.checkData(ctx); err != nil {
		if source != "" {
			return nil, fmt.Errorf("%w (in %s)", err, source)
		}
		return nil, err
	}
	params := map[string]string{"pipeline": source, "pipeline_sha256": digest(raw), "data": spec.Data.Source(),
		"target": spec.Data.Target, "alias": spec.Evaluate.Alias, "candidates": fmt.Sprint(len(spec.Select.Candidates))}
	run, err := e.reg.StartRun(ctx, "pipeline", spec.Name, o.Actor, params)
	if err != nil {
		return nil, err
	}
	e.dir = filepath.Join(o.RunsDir, run.ID)
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		e.reg.FinishRun(context.WithoutCancel(ctx), run.ID, registry.Failed, nil, err)
		return nil, fmt.Errorf("kiln: pipeline: run directory: %w", err)
	}
	if e.lock, err = lockRun(e.dir); err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(filepath.Join(e.dir, "pipeline.yaml"), raw, 0o644); err != nil {
		e.lock.release()
		return nil, err
	}
	e.state = &State{RunID: run.ID, Model: spec.Name, Status: RunRunning, SpecSHA256: digest(raw), Source: source, Started: run.StartedAt}
	for _, s := range Stages {
		e.state.Stages = append(e.state.Stages, StageState{Name: s, Status: StagePending})
	}
	if err := writeState(e.dir, e.state); err != nil {
		e.lock.release()
		return nil, err
	}
	e.log.Info("pipeline: run started", "run", run.ID, "model", spec.Name, "data", spec.Data.Source(), "dir", e.dir)
	return &Run{eng: e}, nil
}

// Resume reopens run id, interrupted (its process died: kill -9, a
// crash, a power loss), to continue from its first unfinished stage. raw
// must be the same pipeline file (checked by digest; nil reads the copy
// the run keeps). A run that ended (FINISHED, FAILED, KILLED) or that
// another process is running is FailedPrecondition.
func Resume(ctx context.Context, id string, raw []byte, o Options) (*Run, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	st, err := ReadState(o.RunsDir, id)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(o.RunsDir, id)
	if raw == nil {
		if raw, err = os.ReadFile(filepath.Join(dir, "pipeline.yaml")); err != nil {
			return nil, fmt.Errorf("kiln: pipeline: run %s: %w", id, err)
		}
	}
	if digest(raw) != st.SpecSHA256 {
		return nil, core.Errorf(core.FailedPrecondition, "kiln: pipeline: run %s was started from another pipeline file (sha256 %s); resume it with that file, or without one (the run keeps a copy)", id, st.SpecSHA256[:12])
	}
	if st.Status != RunRunning {
		return nil, core.Errorf(core.FailedPrecondition, "kiln: pipeline: run %s has ended (%s); only an interrupted run resumes", id, st.Status)
	}
	lock, err := lockRun(dir)
	if err != nil {
		return nil, err
	}
	// Read the state again under the lock: the process that held it may
	// have written it since.
	if st, err = ReadState(o.RunsDir, id); err != nil {
		lock.release()
		return nil, err
	}
	spec, err := Parse(raw)
	if err != nil {
		lock.release()
		return nil, err
	}
	e := &engine{spec: spec, raw: raw, opts: o, log: o.Logger, reg: o.Registry, dir: dir, state: st, lock: lock}
	e.applyOverride()
	if st.Status != RunRunning {
		lock.release()
		return nil, core.Errorf(core.FailedPrecondition, "kiln: pipeline: run %s has ended (%s)", id, st.Status)
	}
	st.Resumes++
	if err := writeState(dir, st); err != nil {
		lock.release()
		return nil, err
	}
	e.log.Info("pipeline: run resumed", "run", id, "model", spec.Name, "resumes", st.Resumes)
	return &Run{eng: e}, nil
}

func (e *engine) applyOverride() {
	if ds := e.opts.DatasetOverride; ds != "" {
		e.spec.Data.Path, e.spec.Data.Flight, e.spec.Data.Dataset = "", "", ds
	}
}

// checkData checks the data's columns (read from its header or schema,
// not its rows) against the spec and against the model at the alias.
func (e *engine) checkData(ctx context.Context) error {
	cols, err := e.sourceColumns(ctx)
	if err != nil {
		return err
	}
	var prodFeatures []string
	prodRef := ""
	if v, err := e.reg.Resolve(ctx, registry.URIScheme+e.spec.Name+"@"+e.spec.Evaluate.Alias); err == nil {
		var pre data.Preprocessor
		if json.Unmarshal(v.Lineage.Preprocessing, &pre) == nil {
			for _, f := range pre.Features {
				prodFeatures = append(prodFeatures, f.Name)
			}
		}
		prodRef = fmt.Sprintf("%s (%s@%s)", v.Ref(), e.spec.Name, e.spec.Evaluate.Alias)
	} else if !core.HasCode(err, core.NotFound) {
		return err
	}
	return checkColumns(cols, e.spec.Data, prodFeatures, prodRef)
}

// stageFunc runs one stage: it returns the stage's output (checkpointed
// as JSON), a summary in words and the metrics its child run records.
type stageFunc func(ctx context.Context, tr *stageRun) (out any, summary string, err error)

// stageRun is one attempt of a stage, recorded as a child run.
type stageRun struct {
	e   *engine
	run registry.Run
}

// epoch records a training epoch's metrics on the stage's run and reports
// them.
func (s *stageRun) epoch(step int, metrics map[string]float64) {
	if err := s.e.reg.LogMetrics(context.Background(), s.run.ID, step, metrics); err != nil {
		s.e.log.Warn("pipeline: cannot log metrics; the run goes on", "run", s.run.ID, "err", err)
	}
}

// Execute runs the stages that have not finished, in order, and ends the
// run: FINISHED with its Result, FAILED with the first stage's error, or
// KILLED when ctx is cancelled. It releases the run's lock.
func (r *Run) Execute(ctx context.Context) (res *Result, err error) {
	e := r.eng
	defer e.lock.release()
	defer func() {
		if p := recover(); p != nil {
			err = core.Errorf(core.Internal, "kiln: pipeline: run %s: internal error: %v\n%s", e.state.RunID, p, debug.Stack())
			e.end(err)
		}
	}()
	funcs := map[string]stageFunc{
		StageData: e.stageData, StagePreprocess: e.stagePreprocess, StageTrain: e.stageTrain,
		StageOptimize: e.stageOptimize, StageEvaluate: e.stageEvaluate, StageRegister: e.stageRegister,
		StagePromote: e.stagePromote,
	}
	for i, name := range Stages {
		st := e.state.Stage(name)
		if st == nil {
			return nil, fmt.Errorf("kiln: pipeline: run %s: state has no stage %q", e.state.RunID, name)
		}
		if st.Status == StageDone || st.Status == StageSkipped {
			if err := e.restore(name, st.Output); err != nil {
				return nil, e.end(err)
			}
			e.log.Info("pipeline: stage already done", "run", e.state.RunID, "stage", name, "summary", st.Summary)
			continue
		}
		if err := e.runStage(ctx, i, st, funcs[name]); err != nil {
			return nil, e.end(err)
		}
	}
	return e.result(), e.end(nil)
}

// ExecuteWithProgress is Execute that also reports progress to f.
func (r *Run) ExecuteWithProgress(ctx context.Context, f func(Progress)) (*Result, error) {
	prev := r.eng.opts.Progress
	r.eng.opts.Progress = func(p Progress) {
		if prev != nil {
			prev(p)
		}
		f(p)
	}
	return r.Execute(ctx)
}

func (e *engine) progress(p Progress) {
	if e.opts.Progress != nil {
		p.RunID, p.Stages = e.state.RunID, len(Stages)
		e.opts.Progress(p)
	}
}

func (e *engine) runStage(ctx context.Context, i int, st *StageState, f stageFunc) error {
	name := st.Name
	if st.Status == StageRunning && len(st.RunIDs) > 0 {
		// The attempt a dead process left: end its child run.
		last := st.RunIDs[len(st.RunIDs)-1]
		if _, err := e.reg.FinishRun(ctx, last, registry.Killed, nil, errors.New("interrupted: the process stopped during this stage; the run was resumed")); err != nil && !core.HasCode(err, core.FailedPrecondition) {
			return err
		}
	}
	child, err := e.reg.StartRun(ctx, "pipeline."+name, e.spec.Name, e.opts.Actor,
		map[string]string{"pipeline_run": e.state.RunID, "stage": name, "attempt": fmt.Sprint(st.Attempts + 1)})
	if err != nil {
		return err
	}
	now := time.Now().UTC()
	st.Status, st.Attempts, st.Started, st.Ended, st.Error = StageRunning, st.Attempts+1, &now, nil, ""
	st.RunIDs = append(st.RunIDs, child.ID)
	if err := writeState(e.dir, e.state); err != nil {
		return err
	}
	e.current = name
	e.log.Info("pipeline: stage started", "run", e.state.RunID, "stage", name, "step", fmt.Sprintf("%d/%d", i+1, len(Stages)))
	e.progress(Progress{Stage: name, Index: i + 1, Message: "started"})
	out, summary, err := f(ctx, &stageRun{e: e, run: child})
	end := time.Now().UTC()
	st.Ended, st.Seconds = &end, end.Sub(now).Seconds()
	metrics := map[string]float64{"seconds": st.Seconds}
	if err != nil {
		status, rstatus := StageFailed, registry.Failed
		if errors.Is(err, context.Canceled) || ctx.Err() != nil {
			status, rstatus = StageKilled, registry.Killed
		}
		st.Status, st.Error = status, err.Error()
		e.reg.FinishRun(context.WithoutCancel(ctx), child.ID, rstatus, metrics, err)
		e.log.Error("pipeline: stage failed", "run", e.state.RunID, "stage", name, "seconds", round(st.Seconds), "err", err)
		return fmt.Errorf("kiln: pipeline: stage %s: %w", name, err)
	}
	if out != nil {
		b, err := json.Marshal(out)
		if err != nil {
			return err
		}
		st.Output = b
		// The later stages read this stage's output as a resumed run
		// does: from its checkpoint.
		if err := e.restore(name, b); err != nil {
			return err
		}
	}
	st.Status, st.Summary = StageDone, summary
	if out == nil {
		st.Status = StageSkipped
	}
	if _, err := e.reg.FinishRun(ctx, child.ID, registry.Finished, metrics, nil); err != nil {
		return err
	}
	if err := writeState(e.dir, e.state); err != nil {
		return err
	}
	e.log.Info("pipeline: stage done", "run", e.state.RunID, "stage", name, "seconds", round(st.Seconds), "summary", summary)
	e.progress(Progress{Stage: name, Index: i + 1, Message: summary})
	return nil
}

func round(s float64) float64 { return float64(int64(s*1000)) / 1000 }

// end records the run's end in the state file and the registry and
// returns err.
func (e *engine) end(err error) error {
	now := time.Now().UTC()
	st := e.state
	st.Ended = &now
	status, rstatus := RunFinished, registry.Finished
	var metrics map[string]float64
	switch {
	case err == nil:
		st.Result = e.result()
		metrics = map[string]float64{"trained_version": float64(st.Result.Trained.Version), "candidate_version": float64(st.Result.Candidate.Version),
			"promoted": b2f(st.Result.Promoted)}
		if st.Result.Serving > 0 {
			metrics["serving_version"] = float64(st.Result.Serving)
		}
	case errors.Is(err, context.Canceled):
		status, rstatus, st.Error = RunKilled, registry.Killed, err.Error()
	default:
		status, rstatus, st.Error = RunFailed, registry.Failed, err.Error()
	}
	// The registry first: a kill between the two leaves the state file
	// RUNNING, and a resume then finds every stage done and the run
	// ended, and only writes the state.
	if _, ferr := e.reg.FinishRun(context.Background(), st.RunID, rstatus, metrics, err); ferr != nil && !core.HasCode(ferr, core.FailedPrecondition) && err == nil {
		err = ferr
	}
	st.Status = status
	if werr := writeState(e.dir, st); werr != nil && err == nil {
		err = werr
	}
	if err == nil {
		r := st.Result
		e.log.Info("pipeline: run finished", "run", st.RunID, "model", r.Model, "candidate", r.Candidate.String(), "verdict", r.Verdict,
			"promoted", r.Promoted, "alias", r.Alias, "serving", r.Serving)
	} else {
		e.log.Error("pipeline: run ended", "run", st.RunID, "status", status, "err", err)
	}
	return err
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// restore reads a finished stage's output back.
func (e *engine) restore(name string, raw json.RawMessage) error {
	if len(raw) == 0 {
		return nil
	}
	var v any
	switch name {
	case StageData:
		e.data = &dataOut{}
		v = e.data
	case StagePreprocess:
		e.prep = &prepOut{}
		v = e.prep
	case StageTrain:
		e.trained = &trainOut{}
		v = e.trained
	case StageOptimize:
		e.opt = &optimizeOut{}
		v = e.opt
	case StageEvaluate:
		e.eval = &evaluateOut{}
		v = e.eval
	case StageRegister:
		e.register = &registerOut{}
		v = e.register
	case StagePromote:
		e.promote = &promoteOut{}
		v = e.promote
	default:
		return nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("kiln: pipeline: run %s: stage %s's checkpoint: %w", e.state.RunID, name, err)
	}
	return nil
}

func (e *engine) result() *Result {
	r := &Result{RunID: e.state.RunID, Model: e.spec.Name, Alias: e.spec.Evaluate.Alias}
	if e.register != nil {
		r.Trained, r.Candidate, r.EvaluationID = e.register.Trained, e.register.Candidate, e.register.EvaluationID
	}
	if e.eval != nil {
		r.Verdict, r.Reason, r.First, r.Baseline = e.eval.Verdict, e.eval.Reason, e.eval.First, e.eval.Baseline
	}
	if e.promote != nil {
		r.Promoted, r.Serving = e.promote.Promoted, e.promote.Serving
	}
	return r
}

// Status returns a run's state, with the registry's record of the run.
func Status(ctx context.Context, runsDir, id string, reg *registry.Registry) (*State, *registry.Run, error) {
	st, err := ReadState(runsDir, id)
	if err != nil {
		return nil, nil, err
	}
	var run *registry.Run
	if reg != nil {
		if r, err := reg.Run(ctx, id); err == nil {
			run = &r
		}
	}
	return st, run, nil
}

// WriteText writes a run's state as a table: one line per stage.
func (s *State) WriteText(w io.Writer, active bool) error {
	status := s.Status
	if s.Status == RunRunning && !active {
		status = "INTERRUPTED (resume with: kiln pipeline run FILE --resume " + s.RunID + ")"
	}
	fmt.Fprintf(w, "run      %s\nmodel    %s\nstatus   %s\nstarted  %s\n", s.RunID, s.Model, status, s.Started.Format(time.RFC3339))
	if s.Resumes > 0 {
		fmt.Fprintf(w, "resumed  %d time(s)\n", s.Resumes)
	}
	if s.Error != "" {
		fmt.Fprintf(w, "error    %s\n", s.Error)
	}
	for i, st := range s.Stages {
		line := fmt.Sprintf("%d/%d %-10s %-8s", i+1, len(s.Stages), st.Name, st.Status)
		if st.Seconds > 0 {
			line += fmt.Sprintf(" %7.2fs", st.Seconds)
		}
		if st.Attempts > 1 {
			line += fmt.Sprintf(" (%d attempts)", st.Attempts)
		}
		if st.Summary != "" {
			line += "  " + st.Summary
		}
		if st.Error != "" {
			line += "  error: " + st.Error
		}
		if _, err := fmt.Fprintln(w, line); err != nil {
			return err
		}
	}
	if r := s.Result; r != nil {
		fmt.Fprintf(w, "result   %s: %s", r.Candidate, r.Verdict)
		if r.Promoted {
			fmt.Fprintf(w, ", %s@%s -> %d", r.Model, r.Alias, r.Serving)
		}
		fmt.Fprintln(w)
	}
	return nil
}
