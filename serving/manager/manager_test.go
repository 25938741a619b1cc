package manager

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/repository"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { testkit.Main(m) }

func newManager(t *testing.T) (*Manager, string) {
	t.Helper()
	root := testkit.CopyFixture(t, "serving-repo")
	repo, err := repository.Open(root)
	require.NoError(t, err)
	m := New(repo, Options{})
	t.Cleanup(m.Close)
	return m, root
}

func x4(rows int, vals ...float32) batcher.Tensor {
	b := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return batcher.Tensor{DType: core.Float32, Shape: []int64{int64(rows), 4}, Data: b}
}

func floats(t batcher.Tensor) []float32 {
	out := make([]float32, len(t.Data)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
	}
	return out
}

// inferAffine runs x = [1 2 3 4] through model affine and returns y.
func inferAffine(t *testing.T, m *Manager, version string) (int64, []float32) {
	t.Helper()
	v, err := m.Acquire("affine", version)
	require.NoError(t, err)
	defer v.Release()
	outs, err := v.Infer(context.Background(), []batcher.Tensor{x4(1, 1, 2, 3, 4)})
	require.NoError(t, err)
	require.Len(t, outs, 2)
	assert.Equal(t, []float32{10}, floats(outs[1]))
	return v.Number(), floats(outs[0])
}

func TestLoadAllAndAcquire(t *testing.T) {
	m, _ := newManager(t)
	err := m.LoadAll()
	require.Error(t, err, "the corrupt model must fail")
	assert.Contains(t, err.Error(), `model "corrupt": version 1`)
	assert.False(t, m.Ready(), "a model without a serving version makes the server not ready")

	assert.Equal(t, []int64{1, 2}, m.Versions("affine"))
	n, y := inferAffine(t, m, "")
	assert.Equal(t, int64(2), n)
	assert.Equal(t, []float32{4, 7, 10, 13}, y)
	n, y = inferAffine(t, m, "1")
	assert.Equal(t, int64(1), n)
	assert.Equal(t, []float32{3, 5, 7, 9}, y)

	_, err = m.Acquire("affine", "3")
	require.ErrorIs(t, err, ErrNotFound)
	_, err = m.Acquire("affine", "x")
	require.ErrorIs(t, err, ErrNotFound)
	_, err = m.Acquire("nope", "")
	require.ErrorIs(t, err, ErrNotFound)
	_, err = m.Acquire("corrupt", "")
	require.ErrorIs(t, err, ErrUnavailable)
	assert.Contains(t, err.Error(), "version 1")

	idx, err := m.Index(false)
	require.NoError(t, err)
	states := map[string]string{}
	for _, e := range idx {
		states[e.Name+"/"+e.Version] = e.State
		if e.Name == "corrupt" {
			assert.NotEmpty(t, e.Reason)
		}
	}
	assert.Equal(t, map[string]string{
		"affine/1": StateReady, "affine/2": StateReady, "classifier/1": StateReady,
		"int_ops/1": StateReady, "probs/1": StateReady, "corrupt/1": StateUnavailable,
	}, states)
	ready, err := m.Index(true)
	require.NoError(t, err)
	assert.Len(t, ready, 5)

	require.NoError(t, m.Unload("corrupt"))
	assert.True(t, m.Ready())
}

func TestFailedReloadKeepsOldVersionServing(t *testing.T) {
	m, root := newManager(t)
	require.NoError(t, m.Load("affine"))
	// Version 2's file is replaced by garbage; version 1 still loads.
	require.NoError(t, os.WriteFile(filepath.Join(root, "affine", "2", "model.pt"), []byte("garbage"), 0o644))
	err := m.Load("affine")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "version 2")
	n, y := inferAffine(t, m, "")
	assert.Equal(t, int64(2), n, "the old version 2 keeps serving")
	assert.Equal(t, []float32{4, 7, 10, 13}, y)
	idx, err := m.Index(false)
	require.NoError(t, err)
	assert.Contains(t, idx, IndexEntry{Name: "affine", Version: "2", State: StateReady})

	// A config that no longer parses keeps everything serving.
	require.NoError(t, os.WriteFile(filepath.Join(root, "affine", "config.yaml"), []byte("inputs: 3\n"), 0o644))
	require.Error(t, m.Load("affine"))
	_, y = inferAffine(t, m, "1")
	assert.Equal(t, []float32{3, 5, 7, 9}, y)
}

func TestReloadSwapsAtomicallyAndDrains(t *testing.T) {
	m, root := newManager(t)
	require.NoError(t, m.Load("affine"))
	old, err := m.Acquire("affine", "2")
	require.NoError(t, err)
	// Version 2 becomes a copy of version 1 (scale 2) and is reloaded while
	// a request holds the old instance.
	raw, err := os.ReadFile(filepath.Join(root, "affine", "1", "model.pt"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(root, "affine", "2", "model.pt"), raw, 0o644))
	require.NoError(t, m.Load("affine"))
	_, y := inferAffine(t, m, "2")
	assert.Equal(t, []float32{3, 5, 7, 9}, y, "new requests reach the new instance")
	outs, err := old.Infer(context.Background(), []batcher.Tensor{x4(1, 1, 2, 3, 4)})
	require.NoError(t, err, "the old instance serves the request that holds it")
	assert.Equal(t, []float32{4, 7, 10, 13}, floats(outs[0]))
	old.Release()
}

func TestUnload(t *testing.T) {
	m, _ := newManager(t)
	require.NoError(t, m.Load("classifier"))
	v, err := m.Acquire("classifier", "")
	require.NoError(t, err)
	assert.Equal(t, []string{"cat", "dog", "bird"}, v.Labels("scores"))
	v.Release()
	require.NoError(t, m.Unload("classifier"))
	_, err = m.Acquire("classifier", "")
	require.ErrorIs(t, err, ErrNotFound)
	assert.Contains(t, err.Error(), "not loaded")
	require.ErrorIs(t, m.Unload("nope"), ErrNotFound)
	require.ErrorIs(t, m.Load("nope"), ErrNotFound)
	require.NoError(t, m.Load("classifier"))
	v, err = m.Acquire("classifier", "1")
	require.NoError(t, err)
	v.Release()
}

func TestWarmupChecksOutputs(t *testing.T) {
	m, root := newManager(t)
	cfg := `max_batch_size: 0
inputs: [{name: ids, datatype: INT64, dims: [-1]}]
outputs:
  - {name: doubled, datatype: FP32, dims: [-1]}
  - {name: halves, datatype: FP32, dims: [-1]}
`
	require.NoError(t, os.WriteFile(filepath.Join(root, "int_ops", "config.yaml"), []byte(cfg), 0o644))
	err := m.Load("int_ops")
	require.ErrorContains(t, err, `output "doubled": the model returns INT64, the config declares FP32`)

	cfg = `max_batch_size: 0
inputs: [{name: ids, datatype: INT64, dims: [-1]}, {name: other, datatype: INT64, dims: [1]}]
outputs: [{name: doubled, datatype: INT64, dims: [-1]}]
`
	require.NoError(t, os.WriteFile(filepath.Join(root, "int_ops", "config.yaml"), []byte(cfg), 0o644))
	require.ErrorContains(t, m.Load("int_ops"), "forward takes 1 inputs (ids), the config declares 2")
}

// TestLoadOfMissingModelLeavesNoTrace: loading a name that is not a model
// answers NOT_FOUND and leaves nothing behind: readiness, the index, model
// lookups and a later unload all behave as if it had never been asked for,
// even after thousands of such names.
func TestLoadOfMissingModelLeavesNoTrace(t *testing.T) {
	m, _ := newManager(t)
	require.NoError(t, m.Load("classifier"))
	require.True(t, m.Ready())
	before, err := m.Index(false)
	require.NoError(t, err)
	for i := range 2000 {
		require.ErrorIs(t, m.Load(fmt.Sprintf("no_such_model_%d", i)), ErrNotFound)
	}
	assert.True(t, m.Ready(), "a failed load of a missing model must not make the server unready")
	after, err := m.Index(false)
	require.NoError(t, err)
	assert.Equal(t, before, after)
	_, err = m.Acquire("no_such_model_7", "")
	require.ErrorIs(t, err, ErrNotFound)
	assert.Contains(t, err.Error(), "unknown model")
	require.ErrorIs(t, m.Unload("no_such_model_7"), ErrNotFound)
	m.mu.RLock()
	n := len(m.models)
	m.mu.RUnlock()
	assert.Equal(t, 1, n, "only the loaded model has an entry")
}

// TestSetRoute: a route loads exactly its versions and its default answers
// unversioned requests; moving the default back to a kept version swaps
// nothing; a route to a missing or broken version switches nothing; later
// polls keep the route; a zero route returns to the version policy.
func TestSetRoute(t *testing.T) {
	m, root := newManager(t)
	require.NoError(t, os.RemoveAll(filepath.Join(root, "corrupt"))) // Poll would load it
	require.NoError(t, m.Load("affine"))                             // policy "all": versions 1 and 2
	n, _ := inferAffine(t, m, "")
	require.Equal(t, int64(2), n)

	require.NoError(t, m.SetRoute("affine", Route{Default: 1}))
	assert.Equal(t, []int64{1}, m.Versions("affine"))
	n, y := inferAffine(t, m, "")
	assert.Equal(t, int64(1), n)
	assert.Equal(t, []float32{3, 5, 7, 9}, y)
	_, err := m.Acquire("affine", "2")
	require.ErrorIs(t, err, ErrNotFound, "a version outside the route is not served")

	require.NoError(t, m.SetRoute("affine", Route{Default: 2, Keep: []int64{1}}))
	assert.Equal(t, []int64{1, 2}, m.Versions("affine"))
	n, y = inferAffine(t, m, "")
	assert.Equal(t, int64(2), n)
	assert.Equal(t, []float32{4, 7, 10, 13}, y)
	v1, err := m.Acquire("affine", "1")
	require.NoError(t, err)
	v1.Release()

	// Back to 1, still loaded: the same instance answers at once.
	require.NoError(t, m.SetRoute("affine", Route{Default: 1, Keep: []int64{2}}))
	again, err := m.Acquire("affine", "")
	require.NoError(t, err)
	assert.Same(t, v1, again, "moving the default to a kept version reloads nothing")
	again.Release()

	// A version the repository lacks, and a broken one: nothing switches.
	require.ErrorIs(t, m.SetRoute("affine", Route{Default: 3}), ErrNotFound)
	require.NoError(t, os.MkdirAll(filepath.Join(root, "affine", "3"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "affine", "3", "model.pt"), []byte("garbage"), 0o644))
	require.Error(t, m.SetRoute("affine", Route{Default: 3, Keep: []int64{1}}))
	n, _ = inferAffine(t, m, "")
	assert.Equal(t, int64(1), n, "a failed route leaves the default serving")
	r, ok := m.RouteOf("affine")
	require.True(t, ok)
	assert.Equal(t, Route{Default: 1, Keep: []int64{2}}, r)

	// A repository change (version 3 becomes a valid copy of 2) reloads the
	// model under its route, not under policy "all".
	raw, err := os.ReadFile(filepath.Join(root, "affine", "2", "model.pt"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(root, "affine", "3", "model.pt"), raw, 0o644))
	require.NoError(t, m.Poll())
	assert.Equal(t, []int64{1, 2}, m.Versions("affine"))
	n, _ = inferAffine(t, m, "")
	assert.Equal(t, int64(1), n)

	require.Error(t, m.SetRoute("affine", Route{Default: 0, Keep: []int64{1}}), "keep without a default")
	require.Error(t, m.SetRoute("affine", Route{Default: 2, Keep: []int64{-1}}))

	require.NoError(t, m.SetRoute("affine", Route{}))
	_, ok = m.RouteOf("affine")
	assert.False(t, ok)
	assert.Equal(t, []int64{1, 2, 3}, m.Versions("affine"))
	n, _ = inferAffine(t, m, "")
	assert.Equal(t, int64(3), n, "without a route the highest version answers")
}
