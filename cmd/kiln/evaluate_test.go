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

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/evaluate"
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
