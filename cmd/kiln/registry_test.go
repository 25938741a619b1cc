package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/registry"
)

// registryCmd runs `kiln registry ARGS...` against the registry db and
// returns its standard output.
func registryCmd(t *testing.T, db string, args ...string) (string, error) {
	t.Helper()
	cmd := newRegistryCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(append(append([]string{}, args...), "--registry", db, "--actor", "tester"))
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

// kiln train --register records a run (params, one metric step per epoch,
// final metrics) and registers the package; kiln optimize from
// models:/NAME/VERSION registers its result with that version as parent;
// kiln registry lists, shows and moves them.
func TestTrainRegistersAndRegistryCommands(t *testing.T) {
	home := t.TempDir()
	t.Setenv(kilnenv.Home, home)
	t.Setenv(kilnenv.Registry, "")
	t.Setenv(kilnenv.RegistryKey, "")
	t.Setenv(kilnenv.RegistryKeyFile, "")
	dir := t.TempDir()
	csv := blobsCSV(t)
	spec := filepath.Join(dir, "spec.yaml")
	require.NoError(t, os.WriteFile(spec, []byte(`
model:
  layers: [{type: linear, out: 8}, {type: relu}, {type: linear}]
split: {val: 0.2, test: 0.2, stratify: true}
train: {epochs: 4, batch_size: 32, seed: 1, optimizer: {type: adam, lr: 0.02}}
`), 0o644))
	db := filepath.Join(home, "registry.db") // the default registry
	var stdout, stderr bytes.Buffer
	err := runTrain(context.Background(), &stdout, &stderr, trainOptions{spec: spec, data: csv, target: "cls", out: filepath.Join(dir, "pkg"), seed: -1,
		register: "blobs", reg: registryFlags{actor: "tester"}})
	require.NoError(t, err, stderr.String())
	assert.Contains(t, stdout.String(), "registered  models:/blobs/1 (sha256:")

	ctx := context.Background()
	r, err := registry.Open(ctx, db, registry.Options{})
	require.NoError(t, err)
	defer r.Close()
	v1, err := r.Version(ctx, "blobs", 1)
	require.NoError(t, err)
	run, err := r.Run(ctx, v1.RunID)
	require.NoError(t, err)
	assert.Equal(t, registry.Finished, run.Status)
	assert.Equal(t, "train", run.Kind)
	assert.Equal(t, "blobs", run.Model)
	assert.Equal(t, "tester", run.CreatedBy)
	assert.Equal(t, "4", run.Params["epochs"])
	assert.Equal(t, "adam", run.Params["optimizer.type"])
	assert.Equal(t, "cls", run.Params["data.target"])
	assert.Greater(t, run.Metrics["test_accuracy"], 0.5)
	assert.Equal(t, 4.0, run.Metrics["epochs"])
	ms, err := r.RunMetrics(ctx, run.ID)
	require.NoError(t, err)
	steps := map[int]bool{}
	for _, m := range ms {
		if m.Key == "loss" {
			steps[m.Step] = true
		}
	}
	assert.Equal(t, map[int]bool{1: true, 2: true, 3: true, 4: true}, steps)
	assert.NotEmpty(t, v1.Lineage.DataSHA256)
	assert.NotEmpty(t, v1.Lineage.Hyperparameters)

	// A failed training is a FAILED run with its error.
	err = runTrain(ctx, &stdout, &stderr, trainOptions{spec: spec, data: csv, target: "klass", out: filepath.Join(dir, "bad"), seed: -1,
		reg: registryFlags{dsn: db}})
	require.Error(t, err)
	runs, err := r.Runs(ctx, "", 1)
	require.NoError(t, err)
	assert.Equal(t, registry.Failed, runs[0].Status)
	assert.Contains(t, runs[0].Error, `target column "klass" not found`)

	// kiln optimize from the registered version; its parent is recorded.
	ocmd := newOptimizeCmd()
	var oout bytes.Buffer
	ocmd.SetOut(&oout)
	ocmd.SetErr(&oout)
	ocmd.SetArgs([]string{"--model", "models:/blobs/latest", "--data", csv, "--quantize", "int8", "--out", filepath.Join(dir, "int8"),
		"--register", "blobs-int8", "--registry", db})
	require.NoError(t, ocmd.ExecuteContext(ctx), oout.String())
	assert.Contains(t, oout.String(), "registered models:/blobs-int8/1 (sha256:")
	assert.Contains(t, oout.String(), "parent models:/blobs/1)")
	q, err := r.Version(ctx, "blobs-int8", 1)
	require.NoError(t, err)
	assert.Equal(t, &registry.Ref{Model: "blobs", Version: 1}, q.Parent)
	assert.Contains(t, string(q.Lineage.Optimization), `"quantize":"int8"`)
	orun, err := r.Run(ctx, q.RunID)
	require.NoError(t, err)
	assert.Equal(t, "optimize", orun.Kind)
	assert.Equal(t, "int8", orun.Params["quantize"])

	// kiln registry.
	out, err := registryCmd(t, db, "ls")
	require.NoError(t, err, out)
	assert.Contains(t, out, "NAME        LATEST  ALIASES")
	assert.Contains(t, out, "blobs-int8  1")
	out, err = registryCmd(t, db, "alias", "set", "blobs", "production", "1", "--reason", "first")
	require.NoError(t, err, out)
	assert.Equal(t, "blobs@production: none -> 1\n", out)
	_, err = registryCmd(t, db, "alias", "set", "blobs", "production", "1", "--expect", "none")
	assert.ErrorContains(t, err, `alias "production" of model "blobs" is at version 1; expected it not to exist`)
	_, err = registryCmd(t, db, "alias", "set", "blobs", "production", "7")
	assert.ErrorContains(t, err, `model "blobs" has no version 7`)
	_, err = registryCmd(t, db, "alias", "set", "blobs", "production", "x")
	assert.ErrorContains(t, err, `VERSION "x" is not a positive integer`)
	_, err = registryCmd(t, db, "versions", "nope")
	assert.ErrorContains(t, err, `model "nope" not found (models: blobs, blobs-int8)`)
	_, err = registryCmd(t, db, "history", "blobs", "Prod")
	assert.ErrorContains(t, err, `alias "Prod"`)

	out, err = registryCmd(t, db, "versions", "blobs")
	require.NoError(t, err, out)
	assert.Contains(t, out, "sha256:"+v1.Digest[:12])
	assert.Contains(t, out, "production")
	out, err = registryCmd(t, db, "show", "models:/blobs@production")
	require.NoError(t, err, out)
	assert.Contains(t, out, "digest   sha256:"+v1.Digest)
	out, err = registryCmd(t, db, "show", "blobs-int8")
	require.NoError(t, err, out)
	assert.Contains(t, out, "models:/blobs/1")
	out, err = registryCmd(t, db, "history", "blobs", "--json")
	require.NoError(t, err, out)
	var hist []registry.AliasEvent
	require.NoError(t, json.Unmarshal([]byte(out), &hist))
	require.Len(t, hist, 1)
	assert.Equal(t, registry.AliasEvent{ID: hist[0].ID, Model: "blobs", Alias: "production", To: 1, Actor: "tester", Reason: "first", At: hist[0].At}, hist[0])
	out, err = registryCmd(t, db, "runs", "--model", "blobs", "--json")
	require.NoError(t, err, out)
	var rs []registry.Run
	require.NoError(t, json.Unmarshal([]byte(out), &rs))
	require.Len(t, rs, 1)
	assert.Equal(t, run.ID, rs[0].ID)
	out, err = registryCmd(t, db, "runs")
	require.NoError(t, err, out)
	assert.Contains(t, out, "FAILED")
	fetched := filepath.Join(dir, "fetched")
	out, err = registryCmd(t, db, "fetch", "models:/blobs@production", fetched)
	require.NoError(t, err, out)
	assert.FileExists(t, filepath.Join(fetched, "model.pt"))
}

// Without --registry, $KILN_REGISTRY or --register, training records
// nothing.
func TestTrainWithoutRegistryRecordsNothing(t *testing.T) {
	home := t.TempDir()
	t.Setenv(kilnenv.Home, home)
	t.Setenv(kilnenv.Registry, "")
	on, err := registryFlags{}.configured()
	require.NoError(t, err)
	assert.False(t, on)
	tr, err := startRun(context.Background(), registryFlags{}, "", "train", nil)
	require.NoError(t, err)
	assert.Nil(t, tr)
	assert.NoFileExists(t, filepath.Join(home, "registry.db"))
	t.Setenv(kilnenv.Registry, filepath.Join(home, "r.db"))
	on, err = registryFlags{}.configured()
	require.NoError(t, err)
	assert.True(t, on)
}
