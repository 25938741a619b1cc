package flightserver_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/registry"
	kflight "github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

// With a registry, the train action records a run (its id in the job
// status while it runs and after), registers the result with `register`,
// and a failing job leaves a FAILED run; on SQLite and PostgreSQL.
func TestModelTrainerRecordsRuns(t *testing.T) {
	for _, backend := range []string{"sqlite", "postgres"} {
		t.Run(backend, func(t *testing.T) {
			dsn := filepath.Join(t.TempDir(), "registry.db")
			if backend == "postgres" {
				dsn = testkit.PostgreSQL(t)
			}
			reg, err := registry.Open(context.Background(), dsn, registry.Options{ArtifactDir: filepath.Join(t.TempDir(), "artifacts"), Logger: quietLogger()})
			require.NoError(t, err)
			t.Cleanup(func() { reg.Close() })
			repoRoot := t.TempDir()
			repo, err := repository.Open(repoRoot)
			require.NoError(t, err)
			mgr := manager.New(repo, manager.Options{Logger: quietLogger()})
			t.Cleanup(mgr.Close)
			mt, err := kflight.NewModelTrainer(kflight.ModelTrainerOptions{Repository: repoRoot, Load: mgr.Load, Registry: reg, Actor: "flight-test"})
			require.NoError(t, err)
			e := start(t, kflight.Options{Trainer: mt, Models: kflight.ManagerModels(mgr)})
			ctx := ctxT(t)
			_, err = e.put(ctx, "blobs", blobsBatch(150, 1))
			require.NoError(t, err)

			id := e.startTrain(t, ctx, map[string]any{
				"dataset": "blobs", "target": "cls", "spec": blobsSpec, "epochs": 4, "seed": 3, "register": "blobs-clf",
			})
			st, _ := e.waitJob(t, ctx, id)
			require.Equal(t, kflight.JobSucceeded, st.State, "status %+v", st)
			require.Len(t, st.RunID, 32, "status %+v", st)
			var res kflight.TrainResult
			require.NoError(t, json.Unmarshal(st.Result, &res))
			require.Equal(t, st.RunID, res.RunID)
			require.NotNil(t, res.Registered)
			require.Equal(t, registry.Ref{Model: "blobs-clf", Version: 1}, *res.Registered)

			run, err := reg.Run(ctx, st.RunID)
			require.NoError(t, err)
			require.Equal(t, registry.Finished, run.Status)
			require.Equal(t, "train", run.Kind)
			require.Equal(t, "blobs-clf", run.Model)
			require.Equal(t, "flight-test", run.CreatedBy)
			require.Equal(t, "blobs", run.Params["dataset"])
			require.Equal(t, "4", run.Params["epochs"])
			require.Contains(t, run.Metrics, "test_accuracy")
			require.Equal(t, 4.0, run.Metrics["epochs"])
			hist, err := reg.RunMetrics(ctx, st.RunID)
			require.NoError(t, err)
			losses := 0
			for _, m := range hist {
				if m.Key == "loss" {
					losses++
				}
			}
			require.Equal(t, 4, losses, "one loss per epoch: %+v", hist)
			v, err := reg.Version(ctx, "blobs-clf", 1)
			require.NoError(t, err)
			require.Equal(t, st.RunID, v.RunID)
			require.Equal(t, res.RegisteredDigest, v.Digest)
			require.NotEmpty(t, v.Lineage.Spec)

			// Without register: a run, no new version.
			id = e.startTrain(t, ctx, map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "epochs": 1})
			st, _ = e.waitJob(t, ctx, id)
			require.Equal(t, kflight.JobSucceeded, st.State, "status %+v", st)
			require.Len(t, st.RunID, 32)
			m, err := reg.Model(ctx, "blobs-clf")
			require.NoError(t, err)
			require.Equal(t, 1, m.LatestVersion)

			// A job that fails once training starts (a layer too wide for
			// the data: see TestModelTrainerCancelAndErrors) is a FAILED run.
			id = e.startTrain(t, ctx, map[string]any{"dataset": "blobs", "target": "cls", "epochs": 1, "model": "doomed",
				"spec": "model: {layers: [{type: linear, in: 999}]}"})
			st, _ = e.waitJob(t, ctx, id)
			require.Equal(t, kflight.JobFailed, st.State, "status %+v", st)
			require.Len(t, st.RunID, 32)
			run, err = reg.Run(ctx, st.RunID)
			require.NoError(t, err)
			require.Equal(t, registry.Failed, run.Status)
			require.NotEmpty(t, run.Error)

			// A bad registered model name fails the action itself.
			_, err = e.action(ctx, "train", map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "register": "../x"})
			requireCode(t, err, codes.InvalidArgument, "register")
		})
	}
}

// Without a registry, `register` fails the action (no job starts).
func TestModelTrainerRegisterNeedsRegistry(t *testing.T) {
	repoRoot := t.TempDir()
	mt, err := kflight.NewModelTrainer(kflight.ModelTrainerOptions{Repository: repoRoot})
	require.NoError(t, err)
	e := start(t, kflight.Options{Trainer: mt})
	ctx := ctxT(t)
	_, err = e.put(ctx, "blobs", blobsBatch(30, 1))
	require.NoError(t, err)
	_, err = e.action(ctx, "train", map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "register": "blobs"})
	requireCode(t, err, codes.FailedPrecondition, "--registry")
	id := e.startTrain(t, ctx, map[string]any{"dataset": "blobs", "target": "cls", "spec": blobsSpec, "epochs": 1})
	st, _ := e.waitJob(t, ctx, id)
	require.Equal(t, kflight.JobSucceeded, st.State, "status %+v", st)
	require.Empty(t, st.RunID)
}
