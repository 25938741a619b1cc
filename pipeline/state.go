package pipeline

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"syscall"
	"time"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/kilnml/kiln/core"
)

// Stage states.
const (
	StagePending = "PENDING"
	StageRunning = "RUNNING"
	StageDone    = "DONE"
	StageSkipped = "SKIPPED"
	StageFailed  = "FAILED"
	StageKilled  = "KILLED"
)

// Run states (State.Status): a run is RUNNING until it ends FINISHED,
// FAILED or KILLED (cancelled); a RUNNING run whose process is gone (its
// lock is free) is resumable.
const (
	RunRunning  = "RUNNING"
	RunFinished = "FINISHED"
	RunFailed   = "FAILED"
	RunKilled   = "KILLED"
)

// StageState is one stage of a run, as state.json keeps it.
type StageState struct {
	Name   string `json:"name"`
	Status string `json:"status"`
	// Attempts counts the times the stage started (more than one after a
	// resume); RunIDs are the registry's child runs, one per attempt.
	Attempts int        `json:"attempts,omitempty"`
	RunIDs   []string   `json:"run_ids,omitempty"`
	Started  *time.Time `json:"started,omitempty"`
	Ended    *time.Time `json:"ended,omitempty"`
	Seconds  float64    `json:"seconds,omitempty"`
	Error    string     `json:"error,omitempty"`
	// Summary says what the stage produced, in words.
	Summary string `json:"summary,omitempty"`
	// Output is the stage's checkpointed result (JSON), read back on
	// resume.
	Output json.RawMessage `json:"output,omitempty"`
}

// State is a pipeline run's state file, RUNS_DIR/RUN_ID/state.json,
// rewritten atomically after every change.
type State struct {
	RunID string `json:"run_id"`
	Model string `json:"model"`
	// Status is RUNNING, FINISHED, FAILED or KILLED.
	Status string `json:"status"`
	// SpecSHA256 is the pipeline file's digest: a resume needs the same
	// file. Source is where it was read from.
	SpecSHA256 string       `json:"spec_sha256"`
	Source     string       `json:"source,omitempty"`
	Started    time.Time    `json:"started"`
	Ended      *time.Time   `json:"ended,omitempty"`
	Resumes    int          `json:"resumes,omitempty"`
	Error      string       `json:"error,omitempty"`
	Stages     []StageState `json:"stages"`
	// Result is the run's outcome once it ended well.
	Result *Result `json:"result,omitempty"`
}

// Stage returns the state of stage name.
func (s *State) Stage(name string) *StageState {
	for i := range s.Stages {
		if s.Stages[i].Name == name {
			return &s.Stages[i]
		}
	}
	return nil
}

var runIDRE = regexp.MustCompile(`^[0-9a-f]{32}$`)

// checkRunID refuses anything but a registry run id (32 hex digits), so
// that an id never names a path outside the runs directory.
func checkRunID(id string) error {
	if !runIDRE.MatchString(id) {
		return core.Errorf(core.InvalidArgument, "kiln: pipeline: run id %q: want 32 lower-case hex digits", id)
	}
	return nil
}

const stateFile = "state.json"

// ReadState reads the state of run id in runsDir. An unknown run is
// NotFound.
func ReadState(runsDir, id string) (*State, error) {
	if err := checkRunID(id); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(runsDir, id, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, core.Errorf(core.NotFound, "kiln: pipeline: no run %s in %s", id, runsDir)
	}
	if err != nil {
		return nil, fmt.Errorf("kiln: pipeline: run %s: %w", id, err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("kiln: pipeline: run %s: %s: %w", id, stateFile, err)
	}
	return &s, nil
}

// writeState writes s into dir/state.json atomically: a temporary file,
// fsync'd, renamed over the old one, the directory fsync'd.
func writeState(dir string, s *State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, stateFile), b, 0o644)
}

// runLock is an exclusive flock on RUN_DIR/lock held while a process runs
// the pipeline: the kernel drops it when the process dies (kill -9
// included), which is how a resume tells an interrupted run from a
// running one.
type runLock struct{ f *os.File }

func lockRun(dir string) (*runLock, error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		pid, _ := os.ReadFile(f.Name())
		f.Close()
		return nil, core.Errorf(core.FailedPrecondition, "kiln: pipeline: run %s is running in another process (pid %s)", filepath.Base(dir), string(pid))
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(fmt.Sprint(os.Getpid())), 0)
	return &runLock{f: f}, nil
}

func (l *runLock) release() {
	if l != nil && l.f != nil {
		syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
		l.f.Close()
		l.f = nil
	}
}

// Active reports whether a process holds run dir's lock now.
func Active(runsDir, id string) bool {
	if checkRunID(id) != nil {
		return false
	}
	f, err := os.OpenFile(filepath.Join(runsDir, id, "lock"), os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}
