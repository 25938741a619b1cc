package train_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
)

// resumeJob is the run the kill -9 test interrupts: the digits MLP with
// dropout, so that both the shuffling RNG and libtorch's RNG matter.
func resumeJob(ckpt string) train.Job {
	return train.Job{
		Model: nn.Sequential(nn.Linear(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(0)),
		Data:  data.Options{Target: "digit", Task: data.Classification},
		Split: data.SplitOptions{Val: 0.15, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 12, BatchSize: 32, Seed: 3, CheckpointDir: ckpt, Resume: true,
			Optimizer: train.Optimizer{Type: "sgd", LR: 0.05, Momentum: 0.9},
			Schedule:  train.Schedule{Type: "cosine"}},
	}
}

// TestKillChild is the child process of TestKillAndResume: it trains with
// checkpoints, slowly, until it is killed. It is skipped in normal runs.
func TestKillChild(t *testing.T) {
	if os.Getenv("KILN_TRAIN_CHILD") == "" {
		t.Skip("child process of TestKillAndResume only")
	}
	tb, err := data.ReadCSVFile(os.Getenv("KILN_TRAIN_DATA"))
	require.NoError(t, err)
	_, err = train.Run(context.Background(), resumeJob(os.Getenv("KILN_TRAIN_CKPT")), tb, "", "", func(e train.Event) {
		if e.Kind == "step" {
			time.Sleep(20 * time.Millisecond) // stretch each epoch so the parent can kill mid-way
		}
	})
	require.NoError(t, err)
}

func TestKillAndResume(t *testing.T) {
	prev := core.NumThreads()
	require.NoError(t, core.SetNumThreads(1))
	defer core.SetNumThreads(prev)
	csv := filepath.Join(dataDir(t), "digits.csv")
	tb := loadCSV(t, "digits.csv")

	// The uninterrupted run.
	full, err := train.Run(context.Background(), resumeJob(filepath.Join(t.TempDir(), "ckpt")), tb, "", "", nil)
	require.NoError(t, err)

	ckpt := filepath.Join(t.TempDir(), "ckpt")
	cmd := exec.Command(os.Args[0], "-test.run=^TestKillChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), "KILN_TRAIN_CHILD=1", "KILN_NUM_THREADS=1",
		"KILN_TRAIN_DATA="+csv, "KILN_TRAIN_CKPT="+ckpt)
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	killedAt := 0
	deadline := time.After(60 * time.Second)
wait:
	for {
		select {
		case err := <-done:
			t.Fatalf("the child finished before it was killed: %v", err)
		case <-deadline:
			cmd.Process.Kill()
			t.Fatal("no checkpoint of epoch 4 within 60 s")
		case <-time.After(20 * time.Millisecond):
			if _, e, _ := train.LatestCheckpoint(ckpt); e >= 4 {
				killedAt = e
				require.NoError(t, cmd.Process.Signal(os.Kill)) // kill -9
				<-done
				break wait
			}
		}
	}
	_, atKill, err := train.LatestCheckpoint(ckpt)
	require.NoError(t, err)
	require.Less(t, atKill, 12, "killed mid-way")
	require.GreaterOrEqual(t, atKill, killedAt)

	resumed, err := train.Run(context.Background(), resumeJob(ckpt), tb, "", "", nil)
	require.NoError(t, err)
	assert.Equal(t, atKill, resumed.Result.ResumedFrom, "resumes from the last checkpoint")
	assert.Len(t, resumed.Result.History, 12, "history carries over")
	t.Logf("killed after epoch %d; test accuracy uninterrupted %.4f, resumed %.4f",
		atKill, full.Test["accuracy"], resumed.Test["accuracy"])
	assert.InDelta(t, full.Test["accuracy"], resumed.Test["accuracy"], 0.005, "same final metric ±0.5 pt")
	assert.InDelta(t, full.Val["loss"], resumed.Val["loss"], 1e-4)
}

func TestResumeRejectsOtherHyperparameters(t *testing.T) {
	tb := loadCSV(t, "digits.csv")
	ckpt := filepath.Join(t.TempDir(), "ckpt")
	j := resumeJob(ckpt)
	j.Train.Epochs = 1
	_, err := train.Run(context.Background(), j, tb, "", "", nil)
	require.NoError(t, err)
	j.Train.Optimizer.LR = 0.1
	_, err = train.Run(context.Background(), j, tb, "", "", nil)
	assert.ErrorContains(t, err, "written with other hyper-parameters")
}

func TestResumeKeepsEarlyStoppingState(t *testing.T) {
	tb := loadCSV(t, "digits.csv")
	ckpt := filepath.Join(t.TempDir(), "ckpt")
	j := resumeJob(ckpt)
	j.Train.EarlyStopping = &train.EarlyStopping{Patience: 50, Metric: "accuracy"}
	j.Train.Epochs = 3
	first, err := train.Run(context.Background(), j, tb, "", "", nil)
	require.NoError(t, err)
	dir, epoch, err := train.LatestCheckpoint(ckpt)
	require.NoError(t, err)
	assert.Equal(t, 3, epoch)
	assert.FileExists(t, filepath.Join(dir, "best.pt"))

	j.Train.Epochs = 5 // more epochs: the run continues from epoch 3
	second, err := train.Run(context.Background(), j, tb, "", "", nil)
	require.NoError(t, err)
	assert.Equal(t, 3, second.Result.ResumedFrom)
	assert.Len(t, second.Result.History, 5)
	assert.Equal(t, first.Result.History, second.Result.History[:3])
	best := second.Result.History[second.Result.BestEpoch-1].Val["accuracy"]
	for _, h := range second.Result.History {
		assert.LessOrEqual(t, h.Val["accuracy"], best, "the best epoch is the best one across the resume")
	}
	assert.InDelta(t, best, second.Val["accuracy"], 1e-9, "the net holds the best epoch's weights")
}

// A LATEST file that names anything but a checkpoint directory is refused:
// "ckpt-000001/../../x" read as epoch 1 and led out of the directory.
func TestLatestCheckpointRefusesOtherNames(t *testing.T) {
	for _, name := range []string{"ckpt-000001/../../x", "ckpt--00001", "ckpt-1", "ckpt-0000001x", "ckpt-000000", "../ckpt-000001"} {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "LATEST"), []byte(name+"\n"), 0o644))
		path, epoch, err := train.LatestCheckpoint(dir)
		require.Error(t, err, "%q gave %q, epoch %d", name, path, epoch)
		assert.True(t, core.HasCode(err, core.InvalidArgument), "%q: %v", name, err)
	}
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "LATEST"), []byte("ckpt-001234\n"), 0o644))
	path, epoch, err := train.LatestCheckpoint(dir)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "ckpt-001234"), path)
	assert.Equal(t, 1234, epoch)
}

// Resuming from a damaged checkpoint fails with a coded error naming the
// damage, whatever file is damaged, and never crashes.
func TestResumeRefusesDamagedCheckpoint(t *testing.T) {
	tb := loadCSV(t, "digits.csv")
	ckpt := filepath.Join(t.TempDir(), "ckpt")
	j := resumeJob(ckpt)
	j.Train.Epochs = 1
	j.Train.EarlyStopping = &train.EarlyStopping{Patience: 50, Metric: "accuracy"}
	_, err := train.Run(context.Background(), j, tb, "", "", nil)
	require.NoError(t, err)
	dir, epoch, err := train.LatestCheckpoint(ckpt)
	require.NoError(t, err)
	require.Equal(t, 1, epoch)
	state, err := os.ReadFile(filepath.Join(dir, "state.json"))
	require.NoError(t, err)
	model, err := os.ReadFile(filepath.Join(dir, "model.pt"))
	require.NoError(t, err)

	garbage := []byte("PK\x03\x04 this is not a torch archive \x00\xff")
	cases := []struct {
		file string
		data []byte // nil removes the file
		code core.Code
		want string
	}{
		{"state.json", bytes.Replace(state, []byte(`"best_epoch": 1`), []byte(`"best_epoch": 99`), 1), core.InvalidArgument, "best epoch 99 outside 0..1"},
		{"state.json", bytes.Replace(state, []byte(`"epoch": 1,`), []byte(`"epoch": 2,`), 1), core.InvalidArgument, "epoch 2, but LATEST names epoch 1"},
		{"state.json", bytes.Replace(state, []byte(`"rng": "`), []byte(`"rng": "AAAA`), 1), core.InvalidArgument, "rng"},
		{"state.json", state[:len(state)/2], core.InvalidArgument, "checkpoint state"},
		{"model.pt", garbage, core.InvalidArgument, "resume"},
		{"model.pt", model[:len(model)/2], core.InvalidArgument, "resume"},
		{"optim.pt", garbage, core.InvalidArgument, "optimizer state"},
		{"optim.pt", model, core.InvalidArgument, "optimizer state"}, // an archive, of another kind
		{"optim.pt", nil, core.NotFound, "optimizer state"},
		{"best.pt", garbage, core.InvalidArgument, "best weights"},
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			cp := filepath.Join(t.TempDir(), "ckpt")
			require.NoError(t, os.CopyFS(cp, os.DirFS(ckpt)))
			name := filepath.Join(cp, filepath.Base(dir), c.file)
			if c.data == nil {
				require.NoError(t, os.Remove(name))
			} else {
				require.NoError(t, os.WriteFile(name, c.data, 0o644))
			}
			j := resumeJob(cp)
			j.Train.Epochs = 2
			j.Train.EarlyStopping = &train.EarlyStopping{Patience: 50, Metric: "accuracy"}
			_, err := train.Run(context.Background(), j, tb, "", "", nil)
			require.Error(t, err)
			assert.ErrorContains(t, err, c.want)
			assert.Equal(t, c.code, core.CodeOf(err), "%v", err)
		})
	}
}
