package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/evaluate"
	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/registry"
)

// TestEvaluateCommand checks the command's wiring (the gate itself is
// tested in core/evaluate): a model against itself holds, the table, the
// JSON evidence and the report file, and errors for bad references.
func TestEvaluateCommand(t *testing.T) {
	dir := t.TempDir()
	csv := blobsCSV(t)
	spec := filepath.Join(dir, "spec.yaml")
	require.NoError(t, os.WriteFile(spec, []byte(`
model: {layers: [{type: linear, out: 8}, {type: relu}, {type: linear}]}
train: {epochs: 3, batch_size: 16, seed: 1, optimizer: {type: adam, lr: 0.01}}
`), 0o644))
	pkg := filepath.Join(dir, "pkg")
	var stdout, stderr bytes.Buffer
	require.NoError(t, runTrain(context.Background(), &stdout, &stderr, trainOptions{spec: spec, data: csv, target: "cls", out: pkg, seed: -1, quiet: true}))

	stdout.Reset()
	stderr.Reset()
	report := filepath.Join(dir, "evidence.json")
	o := evaluateOptions{candidate: pkg, baseline: filepath.Join(pkg, "model.pt"), data: csv, alpha: 0.05, bootstrap: 200, seed: 1, batchSize: 64, report: report}
	require.NoError(t, runEvaluate(context.Background(), &stdout, &stderr, o))
	s := stdout.String()
	assert.Contains(t, s, "accuracy *")
	assert.Contains(t, s, "latency p50 ms (batch 64)")
	assert.Contains(t, s, "McNemar    exact binomial: b=0")
	assert.Contains(t, s, "verdict    HOLD: no significant difference")
	assert.Contains(t, stderr.String(), "evaluate: bootstrap done (200/200)")
	var ev evaluate.Evidence
	b, err := os.ReadFile(report)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &ev))
	assert.Equal(t, evaluate.Hold, ev.Verdict)
	assert.Equal(t, 300, ev.Data.Rows)
	assert.Equal(t, csv, ev.Data.Source)
	assert.Equal(t, filepath.Join(pkg, "model.pt"), ev.Baseline.Ref)
	assert.Equal(t, pkg, ev.Baseline.Dir)
	// The blobs table is the model's training table: the evidence says so.
	assert.Len(t, ev.Warnings, 2)

	stdout.Reset()
	o.jsonOut, o.report, o.quiet = true, "", true
	require.NoError(t, runEvaluate(context.Background(), &stdout, &stderr, o))
	var ev2 evaluate.Evidence
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &ev2))
	assert.Equal(t, ev.McNemar, ev2.McNemar)

	bad := o
	bad.candidate = filepath.Join(dir, "missing")
	err = runEvaluate(context.Background(), &stdout, &stderr, bad)
	assert.True(t, core.HasCode(err, core.NotFound), "%v", err)
	assert.ErrorContains(t, err, "candidate: kiln: evaluate: model \""+bad.candidate+"\": no such model package")
	bad = o
	bad.data = filepath.Join(dir, "missing.csv")
	err = runEvaluate(context.Background(), &stdout, &stderr, bad)
	assert.True(t, core.HasCode(err, core.NotFound), "%v", err)
	bad = o
	bad.baseline = spec
	err = runEvaluate(context.Background(), &stdout, &stderr, bad)
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	assert.ErrorContains(t, err, "is a file; evaluate takes a Kiln model package")
	bad = o
	bad.bootstrap = 0
	err = runEvaluate(context.Background(), &stdout, &stderr, bad)
	assert.ErrorContains(t, err, "--bootstrap 0 must be >= 1")
	bad = o
	bad.alpha = 0
	err = runEvaluate(context.Background(), &stdout, &stderr, bad)
	assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
	assert.ErrorContains(t, err, "--alpha 0 is outside (0, 1)")
}

// TestEvaluatePromotesThroughTheRegistry: registry references are fetched
// and evaluated; the verdict is recorded with the candidate; --promote
// moves production to a better candidate by compare-and-swap, citing the
// evaluation, and leaves it where it is for a worse one.
func TestEvaluatePromotesThroughTheRegistry(t *testing.T) {
	home := t.TempDir()
	t.Setenv(kilnenv.Home, home)
	t.Setenv(kilnenv.Registry, "")
	t.Setenv(kilnenv.RegistryKey, "")
	t.Setenv(kilnenv.RegistryKeyFile, "")
	db := filepath.Join(home, "registry.db")
	dir := t.TempDir()
	csv := blobsCSV(t)
	ctx := context.Background()
	for i, tr := range []struct {
		epochs int
		lr     float64
	}{{1, 0.0005}, {20, 0.02}} { // version 1 barely trained, version 2 trained
		spec := filepath.Join(dir, fmt.Sprintf("spec%d.yaml", i))
		require.NoError(t, os.WriteFile(spec, []byte(fmt.Sprintf(`
model: {layers: [{type: linear, out: 8}, {type: relu}, {type: linear}]}
train: {epochs: %d, batch_size: 16, seed: 1, optimizer: {type: adam, lr: %g}}
`, tr.epochs, tr.lr)), 0o644))
		var stdout, stderr bytes.Buffer
		require.NoError(t, runTrain(ctx, &stdout, &stderr, trainOptions{spec: spec, data: csv, target: "cls",
			out: filepath.Join(dir, fmt.Sprintf("pkg%d", i)), seed: -1, quiet: true, register: "blobs", reg: registryFlags{actor: "tester"}}))
	}
	_, err := registryCmd(t, db, "alias", "set", "blobs", "production", "1", "--expect", "none")
	require.NoError(t, err)

	var stdout, stderr bytes.Buffer
	o := evaluateOptions{candidate: "models:/blobs/2", baseline: "models:/blobs@production", data: csv, alpha: 0.05,
		bootstrap: 200, seed: 1, batchSize: 64, quiet: true, promote: true, reg: registryFlags{actor: "gate"}}
	require.NoError(t, runEvaluate(ctx, &stdout, &stderr, o))
	assert.Contains(t, stdout.String(), "verdict    PROMOTE")
	assert.Contains(t, stdout.String(), "promoted   blobs@production: version 1 -> 2")

	r, err := registry.Open(ctx, db, registry.Options{})
	require.NoError(t, err)
	defer r.Close()
	v, err := r.Alias(ctx, "blobs", "production")
	require.NoError(t, err)
	assert.Equal(t, 2, v)
	evs, err := r.Evaluations(ctx, "blobs", 2)
	require.NoError(t, err)
	require.Len(t, evs, 1)
	assert.Equal(t, "PROMOTE", evs[0].Verdict)
	assert.Equal(t, "gate", evs[0].CreatedBy)
	var evidence evaluate.Evidence
	require.NoError(t, json.Unmarshal(evs[0].Evidence, &evidence))
	assert.Equal(t, evaluate.Promote, evidence.Verdict)
	hist, err := r.History(ctx, "blobs", "production")
	require.NoError(t, err)
	last := hist[len(hist)-1]
	assert.Equal(t, 1, last.From)
	assert.Equal(t, 2, last.To)
	assert.Equal(t, "PROMOTE", last.Verdict)
	assert.Equal(t, evs[0].ID, last.EvaluationID)
	assert.Equal(t, "gate", last.Actor)

	// The worse version against production (now 2): not promoted.
	stdout.Reset()
	o.candidate = "models:/blobs/1"
	require.NoError(t, runEvaluate(ctx, &stdout, &stderr, o))
	assert.Contains(t, stdout.String(), "verdict    REJECT")
	assert.Contains(t, stdout.String(), "alias      blobs@production stays at version 2")
	v, err = r.Alias(ctx, "blobs", "production")
	require.NoError(t, err)
	assert.Equal(t, 2, v)
	evs, err = r.Evaluations(ctx, "blobs", 1)
	require.NoError(t, err)
	require.Len(t, evs, 1)
	assert.Equal(t, "REJECT", evs[0].Verdict)

	// Bad references, before any scoring.
	bad := o
	bad.baseline = "models:/blobs/2"
	assert.True(t, core.HasCode(runEvaluate(ctx, &stdout, &stderr, bad), core.InvalidArgument), "--promote needs an alias baseline")
	bad = o
	bad.candidate = filepath.Join(dir, "pkg1")
	assert.True(t, core.HasCode(runEvaluate(ctx, &stdout, &stderr, bad), core.InvalidArgument), "--promote needs a registered candidate")
	bad = o
	bad.baseline = "models:/blobs@staging"
	assert.True(t, core.HasCode(runEvaluate(ctx, &stdout, &stderr, bad), core.NotFound), "unknown alias")
	bad = o
	bad.candidate = "models:/nope/1"
	assert.True(t, core.HasCode(runEvaluate(ctx, &stdout, &stderr, bad), core.NotFound), "unknown model")
}
