package runlog_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/registry/runlog"
)

func TestMain(m *testing.M) { testkit.Main(m) }

func open(t *testing.T) *registry.Registry {
	dir := t.TempDir()
	r, err := registry.Open(context.Background(), filepath.Join(dir, "registry.db"), registry.Options{})
	require.NoError(t, err)
	return r
}

// A nil tracker records nothing and says so when asked to register.
func TestNilTracker(t *testing.T) {
	var tr *runlog.Tracker
	require.Empty(t, tr.ID())
	tr.Epoch(1, map[string]float64{"loss": 1})
	require.NoError(t, tr.LogParams(context.Background(), map[string]string{"a": "b"}))
	require.NoError(t, tr.Finish(nil, nil))
	_, err := tr.Register(context.Background(), "m", t.TempDir(), nil)
	require.ErrorContains(t, err, "no registry")
	tr.Close()
}

// A tracked training: parameters, a step per epoch, final metrics, the
// status from the error (cancelled: KILLED), a version made by the run;
// Close closes the registry it owns.
func TestTrackerRecordsARun(t *testing.T) {
	r := open(t)
	ctx := context.Background()
	job := train.Job{}
	job.Train.Epochs, job.Data.Target = 3, "y"
	tr, err := runlog.Start(ctx, r, runlog.KindTrain, runlog.TrainParams(job, map[string]string{"data": "d.csv"}),
		runlog.Options{Model: "m", Actor: "ann", CloseRegistry: true})
	require.NoError(t, err)
	require.Len(t, tr.ID(), 32)
	for e := 1; e <= 3; e++ {
		tr.Epoch(e, runlog.TrainEpoch(train.Event{Kind: "epoch", Epoch: e, Loss: 1 / float64(e), Metrics: train.Metrics{"accuracy": 0.5}}))
		tr.Epoch(e, runlog.TrainEpoch(train.Event{Kind: "step", Epoch: e})) // steps log nothing
	}
	final := runlog.TrainFinal(&train.Report{Val: train.Metrics{"accuracy": 0.9}, Test: train.Metrics{"accuracy": 0.8}, Result: &train.Result{BestEpoch: 2, History: make([]train.EpochStats, 3)}})
	require.NoError(t, tr.Finish(nil, final))
	run, err := r.Run(ctx, tr.ID())
	require.NoError(t, err)
	require.Equal(t, registry.Finished, run.Status)
	require.Equal(t, "3", run.Params["epochs"])
	require.Equal(t, "y", run.Params["data.target"])
	require.Equal(t, "d.csv", run.Params["data"])
	require.Equal(t, map[string]float64{"val_accuracy": 0.9, "test_accuracy": 0.8, "epochs": 3, "best_epoch": 2, "samples_per_sec": 0}, run.Metrics)
	hist, err := r.RunMetrics(ctx, tr.ID())
	require.NoError(t, err)
	require.Len(t, hist, 9, "loss, lr and val_accuracy for 3 epochs: %+v", hist)

	src := filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", "v1-int8")
	dst := filepath.Join(t.TempDir(), "pkg")
	_, err = modelpkg.Copy(src, dst)
	require.NoError(t, err)
	v, err := tr.Register(ctx, "m", dst, nil)
	require.NoError(t, err)
	require.Equal(t, tr.ID(), v.RunID)
	require.Equal(t, "ann", v.CreatedBy)

	for _, c := range []struct {
		err  error
		want registry.RunStatus
	}{{fmt.Errorf("train: %w", context.Canceled), registry.Killed}, {errors.New("boom"), registry.Failed}} {
		tr2, err := runlog.Start(ctx, r, runlog.KindSelect, nil, runlog.Options{})
		require.NoError(t, err)
		require.NoError(t, tr2.Finish(c.err, nil))
		run, err := r.Run(ctx, tr2.ID())
		require.NoError(t, err)
		require.Equal(t, c.want, run.Status)
		require.Equal(t, c.err.Error(), run.Error)
		require.Equal(t, runlog.DefaultActor(), run.CreatedBy)
	}
	tr.Close()
	_, err = r.Models(ctx)
	require.Error(t, err, "Close closes the registry the tracker owns")
}

func TestFlattenAndPrefixed(t *testing.T) {
	p := map[string]string{}
	runlog.Flatten("x", map[string]any{"a": 1, "b": map[string]any{"c": "s", "d": []int{1, 2}}, "n": nil}, p)
	require.Equal(t, map[string]string{"x.a": "1", "x.b.c": "s", "x.b.d": "[1,2]"}, p)
	require.Equal(t, map[string]float64{"val_a": 1, "k": 2}, runlog.Prefixed("val", map[string]float64{"a": 1}, map[string]float64{"k": 2}))
	lb := &train.Leaderboard{Winner: &train.Entry{Candidate: train.Candidate{Name: "w"}, Score: 0.7, Val: train.Metrics{"accuracy": 0.9}}, Entries: make([]train.Entry, 2)}
	final, params := runlog.SelectFinal(lb)
	require.Equal(t, map[string]string{"winner": "w"}, params)
	require.Equal(t, 2.0, final["candidates"])
	require.Equal(t, 0.9, final["val_accuracy"])
	f, p2 := runlog.SelectFinal(&train.Leaderboard{})
	require.Nil(t, f)
	require.Nil(t, p2)
}
