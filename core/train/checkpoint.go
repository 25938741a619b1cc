package train

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/trainer"
)

// A checkpoint is a directory CheckpointDir/ckpt-NNNNNN holding
//
//	model.pt    the network (TorchScript) after epoch NNNNNN
//	optim.pt    optimizer state and libtorch's generator state
//	best.pt     the best epoch's weights so far (early stopping only)
//	state.json  epoch, Go shuffling RNG state, history, early-stopping state
//
// written into a temporary directory and renamed into place; the file
// LATEST names the newest one and is itself replaced by rename, so a run
// killed at any moment leaves the previous checkpoint intact.

const latestFile = "LATEST"

type ckptState struct {
	Epoch     int          `json:"epoch"`
	RNG       []byte       `json:"rng"`
	History   []EpochStats `json:"history"`
	BestEpoch int          `json:"best_epoch"`
	Best      Metrics      `json:"best,omitempty"`
	BestValue float64      `json:"best_value"`
	Bad       int          `json:"bad_epochs"`
	HasBest   bool         `json:"has_best"`
	// StopReason is set when early stopping ended the run at Epoch.
	StopReason string `json:"stop_reason,omitempty"`
	// Fingerprint ties the checkpoint to the hyper-parameters that shape
	// the run (not epochs or checkpoint settings).
	Fingerprint string `json:"fingerprint"`
}

func (c Config) fingerprint() string {
	c.Epochs, c.CheckpointDir, c.CheckpointEvery, c.Resume, c.ProgressEvery, c.MaxSeconds = 0, "", 0, false, 0, 0
	c.Workers = 0 // a run may resume with another number of ranks
	b, _ := json.Marshal(c)
	return string(b)
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// checkpoint writes the state after `epoch` epochs atomically.
func (r *run) checkpoint(epoch int) (err error) {
	dir := r.cfg.CheckpointDir
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, ".tmp-ckpt-")
	if err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := r.net.Save(filepath.Join(tmp, "model.pt")); err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	if err := r.tr.SaveState(filepath.Join(tmp, "optim.pt")); err != nil {
		return fmt.Errorf("kiln: checkpoint: optimizer state: %w", err)
	}
	if r.best.Valid() {
		if err := r.best.Save(filepath.Join(tmp, "best.pt")); err != nil {
			return fmt.Errorf("kiln: checkpoint: best weights: %w", err)
		}
	}
	rng, err := r.src.MarshalBinary()
	if err != nil {
		return fmt.Errorf("kiln: checkpoint: rng: %w", err)
	}
	st := ckptState{Epoch: epoch, RNG: rng, History: r.res.History, BestEpoch: r.res.BestEpoch,
		Best: r.res.Best, BestValue: r.bestValue, Bad: r.bad, HasBest: r.best.Valid(), StopReason: stopReason(r.res.StopReason),
		Fingerprint: r.cfg.fingerprint()}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "state.json"), b, 0o644); err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	for _, f := range []string{"model.pt", "optim.pt", "best.pt", "state.json"} {
		if err := syncFile(filepath.Join(tmp, f)); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("kiln: checkpoint: %w", err)
		}
	}
	name := fmt.Sprintf("ckpt-%06d", epoch)
	final := filepath.Join(dir, name)
	if err := os.RemoveAll(final); err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, latestFile), []byte(name+"\n"), 0o644); err != nil {
		return fmt.Errorf("kiln: checkpoint: %w", err)
	}
	// Older checkpoints are no longer needed.
	old, _ := filepath.Glob(filepath.Join(dir, "ckpt-*"))
	for _, o := range old {
		if filepath.Base(o) != name {
			os.RemoveAll(o)
		}
	}
	return nil
}

// LatestCheckpoint returns the directory of the newest complete checkpoint
// in dir and its epoch, or "" when there is none. A LATEST file that does
// not name a checkpoint directory (ckpt- and at least six digits) is an
// INVALID_ARGUMENT error.
func LatestCheckpoint(dir string) (string, int, error) {
	b, err := os.ReadFile(filepath.Join(dir, latestFile))
	if os.IsNotExist(err) {
		return "", 0, nil
	}
	if err != nil {
		return "", 0, fmt.Errorf("kiln: checkpoint: %w", err)
	}
	name, epoch, err := parseLatest(b)
	if err != nil {
		return "", 0, err
	}
	return filepath.Join(dir, name), epoch, nil
}

// maxCheckpointEpoch bounds the epoch a checkpoint may record, and so the
// length of its history.
const maxCheckpointEpoch = 1 << 24

// parseLatest reads the contents of a LATEST file: the name of a checkpoint
// directory, ckpt-NNNNNN, and its epoch (1 to maxCheckpointEpoch). Nothing
// else is accepted, so the name cannot lead out of the checkpoint
// directory.
func parseLatest(b []byte) (string, int, error) {
	name := strings.TrimSpace(string(b))
	bad := func() (string, int, error) {
		if len(name) > 64 {
			name = name[:64] + "..."
		}
		return "", 0, core.Errorf(core.InvalidArgument, "kiln: checkpoint: %s names %q, not a checkpoint", latestFile, name)
	}
	digits, ok := strings.CutPrefix(name, "ckpt-")
	if !ok || len(digits) < 6 || len(digits) > 9 {
		return bad()
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return bad()
		}
	}
	epoch, err := strconv.Atoi(digits)
	if err != nil || epoch < 1 || epoch > maxCheckpointEpoch {
		return bad()
	}
	return name, epoch, nil
}

// decodeState reads a checkpoint's state.json, written after `epoch`
// epochs (the epoch LATEST names), and checks that it is consistent: one
// history entry per epoch, a best epoch and a count of bad epochs within
// them, a readable RNG state. Errors are INVALID_ARGUMENT.
func decodeState(b []byte, epoch int) (ckptState, error) {
	var st ckptState
	if err := json.Unmarshal(b, &st); err != nil {
		return ckptState{}, core.Errorf(core.InvalidArgument, "kiln: checkpoint state: %v", err)
	}
	bad := func(format string, args ...any) (ckptState, error) {
		return ckptState{}, core.Errorf(core.InvalidArgument, "kiln: checkpoint state: "+format, args...)
	}
	switch {
	case st.Epoch != epoch:
		return bad("epoch %d, but %s names epoch %d", st.Epoch, latestFile, epoch)
	case len(st.History) != st.Epoch:
		return bad("%d history entries for %d epochs", len(st.History), st.Epoch)
	case st.BestEpoch < 0 || st.BestEpoch > st.Epoch:
		return bad("best epoch %d outside 0..%d", st.BestEpoch, st.Epoch)
	case st.HasBest && st.BestEpoch == 0:
		return bad("best weights saved without a best epoch")
	case st.Bad < 0 || st.Bad > st.Epoch:
		return bad("%d bad epochs in %d", st.Bad, st.Epoch)
	case st.StopReason != "" && st.StopReason != "early_stopping":
		return bad("unknown stop reason %q", st.StopReason)
	}
	for i, h := range st.History {
		if h.Epoch != i+1 {
			return bad("history entry %d is for epoch %d", i+1, h.Epoch)
		}
	}
	if err := new(rand.PCG).UnmarshalBinary(st.RNG); err != nil {
		return bad("rng: %v", err)
	}
	return st, nil
}

// resume restores the newest checkpoint, if any, and returns the number of
// epochs it had completed. A checkpoint whose files are damaged is an
// INVALID_ARGUMENT error, one missing a file NOT_FOUND, one written with
// other hyper-parameters FAILED_PRECONDITION.
func (r *run) resume() (int, error) {
	path, epoch, err := LatestCheckpoint(r.cfg.CheckpointDir)
	if err != nil || path == "" {
		return 0, err
	}
	b, err := os.ReadFile(filepath.Join(path, "state.json"))
	if err != nil {
		return 0, fmt.Errorf("kiln: resume: %w", err)
	}
	st, err := decodeState(b, epoch)
	if err != nil {
		return 0, fmt.Errorf("kiln: resume: %s: %w", path, err)
	}
	if st.Fingerprint != r.cfg.fingerprint() {
		return 0, core.Errorf(core.FailedPrecondition, "kiln: resume: the checkpoint in %s was written with other hyper-parameters:\n  checkpoint %s\n  this run   %s",
			path, st.Fingerprint, r.cfg.fingerprint())
	}
	if err := loadInto(r.net.Handle(), filepath.Join(path, "model.pt")); err != nil {
		return 0, fmt.Errorf("kiln: resume: %w", err)
	}
	if err := r.tr.LoadState(filepath.Join(path, "optim.pt")); err != nil {
		return 0, fmt.Errorf("kiln: resume: optimizer state: %w", err)
	}
	if st.HasBest {
		m, err := native.LoadModule(filepath.Join(path, "best.pt"))
		if err != nil {
			return 0, fmt.Errorf("kiln: resume: best weights: %w", err)
		}
		r.freeBest()
		r.best = m
	}
	if err := r.src.UnmarshalBinary(st.RNG); err != nil {
		return 0, fmt.Errorf("kiln: resume: rng: %w", err)
	}
	r.res.History, r.res.BestEpoch, r.res.Best = st.History, st.BestEpoch, st.Best
	r.bestValue, r.bad, r.res.ResumedFrom = st.BestValue, st.Bad, st.Epoch
	if st.StopReason != "" {
		// Early stopping had ended that run: train no further.
		r.res.StopReason = st.StopReason
		return r.cfg.Epochs, nil
	}
	return st.Epoch, nil
}

// loadInto copies the weights saved at path into m.
func loadInto(m native.Module, path string) error {
	src, err := native.LoadModule(path)
	if err != nil {
		return err
	}
	defer src.Free()
	return trainer.CopyState(m, src)
}

func stopReason(s string) string {
	if s == "early_stopping" {
		return s
	}
	return ""
}
