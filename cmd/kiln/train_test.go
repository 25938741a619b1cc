package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/registry"
)

// blobsCSV writes three well-separated classes in 2-D.
func blobsCSV(t *testing.T) string {
	rng := rand.New(rand.NewPCG(1, 1))
	var b strings.Builder
	b.WriteString("x,y,cls\n")
	centres := [][2]float64{{0, 0}, {4, 0}, {0, 4}}
	names := []string{"a", "b", "c"}
	for i := range 300 {
		c := i % 3
		fmt.Fprintf(&b, "%g,%g,%s\n", centres[c][0]+rng.NormFloat64()*0.5, centres[c][1]+rng.NormFloat64()*0.5, names[c])
	}
	p := filepath.Join(t.TempDir(), "blobs.csv")
	require.NoError(t, os.WriteFile(p, []byte(b.String()), 0o644))
	return p
}

func TestTrainCommand(t *testing.T) {
	dir := t.TempDir()
	csv := blobsCSV(t)
	spec := filepath.Join(dir, "spec.yaml")
	require.NoError(t, os.WriteFile(spec, []byte(`
model:
  layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]
split: {val: 0.2, test: 0.2, stratify: true}
train: {epochs: 10, batch_size: 16, seed: 1, optimizer: {type: adam, lr: 0.01}}
`), 0o644))
	out := filepath.Join(dir, "pkg")
	var stdout, stderr bytes.Buffer
	err := runTrain(context.Background(), &stdout, &stderr, trainOptions{spec: spec, data: csv, target: "cls", out: out, seed: -1})
	require.NoError(t, err, stderr.String())
	assert.Contains(t, stdout.String(), "test        accuracy 1.0000")
	assert.Contains(t, stderr.String(), "epoch 10/10 loss")
	m, err := core.LoadModule(filepath.Join(out, "model.pt"))
	require.NoError(t, err)
	m.Close()
	man, err := modelpkg.Read(out)
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "b", "c"}, man.Labels)

	err = runTrain(context.Background(), &stdout, &stderr, trainOptions{spec: spec, data: csv, target: "klass", out: out, seed: -1})
	assert.ErrorContains(t, err, `target column "klass" not found; the data has columns x, y, cls`)
	err = runTrain(context.Background(), &stdout, &stderr, trainOptions{spec: spec, data: "d.parquet", target: "cls", out: out, seed: -1})
	assert.ErrorContains(t, err, "d.parquet: no such file or directory") // Parquet is read (arrowio.ReadTable); this one is missing
	require.NoError(t, os.WriteFile(spec, []byte("model: {layers: [{type: linearr}]}\n"), 0o644))
	err = runTrain(context.Background(), &stdout, &stderr, trainOptions{spec: spec, data: csv, target: "cls", out: out, seed: -1})
	assert.ErrorContains(t, err, `layer 0 (linearr "l0"): unknown layer type "linearr"`)
}

func TestSelectCommand(t *testing.T) {
	dir := t.TempDir()
	csv := blobsCSV(t)
	spec := filepath.Join(dir, "select.yaml")
	require.NoError(t, os.WriteFile(spec, []byte(`
data: {target: cls}
split: {val: 0.3, stratify: true}
train: {batch_size: 16, seed: 1, optimizer: {type: adam, lr: 0.01}}
search: {depth: [1, 2], width: [4, 16]}
budget: {epochs: 5}
concurrency: 2
`), 0o644))
	var stdout, stderr bytes.Buffer
	out := filepath.Join(dir, "winner")
	db := filepath.Join(dir, "registry.db")
	err := runSelect(context.Background(), &stdout, &stderr, selectOptions{spec: spec, data: csv, register: "blobs", reg: registryFlags{dsn: db}})
	assert.ErrorContains(t, err, "--register needs --out")
	require.NoError(t, runSelect(context.Background(), &stdout, &stderr, selectOptions{spec: spec, data: csv, out: out, register: "blobs", reg: registryFlags{dsn: db}}))
	s := stdout.String()
	assert.Contains(t, s, "rank  candidate")
	assert.Contains(t, s, "mlp-d2-w16-p0-lr0.01")
	assert.Contains(t, s, "winner: mlp-")
	assert.FileExists(t, filepath.Join(out, "model.pt"))
	assert.Equal(t, 4, strings.Count(stderr.String(), "5 epochs"))
	assert.Contains(t, s, "registered: models:/blobs/1 (sha256:")

	// The selection is a run with the winner, per-candidate epochs and the
	// winner's final metrics; the version points at it.
	r, err := registry.Open(context.Background(), db, registry.Options{})
	require.NoError(t, err)
	defer r.Close()
	v, err := r.Version(context.Background(), "blobs", 1)
	require.NoError(t, err)
	run, err := r.Run(context.Background(), v.RunID)
	require.NoError(t, err)
	assert.Equal(t, "select", run.Kind)
	assert.Equal(t, registry.Finished, run.Status)
	assert.Contains(t, s, "winner: "+run.Params["winner"])
	assert.Equal(t, 4.0, run.Metrics["candidates"])
	ms, err := r.RunMetrics(context.Background(), run.ID)
	require.NoError(t, err)
	losses := 0
	for _, m := range ms {
		if strings.HasSuffix(m.Key, ".loss") && !strings.Contains(m.Key, ".val_") {
			losses++
		}
	}
	assert.Equal(t, 4*5, losses) // 4 candidates x 5 epochs
}
