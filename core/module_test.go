package core_test

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
)

// loadTensor reads a raw little-endian tensor the fixture script wrote.
func loadTensor(t *testing.T, tf tensorFile) *core.Tensor {
	t.Helper()
	raw, err := os.ReadFile(fixturePath(tf.File))
	require.NoError(t, err)
	dt, err := core.ParseDType(tf.DType)
	require.NoError(t, err)
	var x *core.Tensor
	switch dt {
	case core.Float32:
		v := make([]float32, len(raw)/4)
		for i := range v {
			v[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
		x, err = core.NewTensor(v, tf.Shape...)
	case core.Int64:
		v := make([]int64, len(raw)/8)
		for i := range v {
			v[i] = int64(binary.LittleEndian.Uint64(raw[8*i:]))
		}
		x, err = core.NewTensor(v, tf.Shape...)
	default:
		t.Fatalf("fixture dtype %v not handled", dt)
	}
	require.NoError(t, err)
	return x
}

func loadFixture(t *testing.T, name string) (*core.Module, fixture) {
	t.Helper()
	f, ok := fixtures[name]
	require.True(t, ok, "fixture %s", name)
	m, err := core.LoadModule(fixturePath(f.File))
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m, f
}

// maxAbsDiff compares two tensors of the same dtype and shape.
func maxAbsDiff(t *testing.T, want, got *core.Tensor) float64 {
	t.Helper()
	require.Equal(t, want.DType(), got.DType())
	require.Equal(t, want.Shape(), got.Shape())
	a, err := want.To(core.Float64)
	require.NoError(t, err)
	defer a.Close()
	b, err := got.To(core.Float64)
	require.NoError(t, err)
	defer b.Close()
	av, _ := core.Data[float64](a)
	bv, _ := core.Data[float64](b)
	d := 0.0
	for i := range av {
		d = math.Max(d, math.Abs(av[i]-bv[i]))
	}
	return d
}

func TestForwardMatchesPythonTorch(t *testing.T) {
	for _, name := range []string{"mlp", "two_inputs", "int_ops", "traced_mlp"} {
		t.Run(name, func(t *testing.T) {
			m, f := loadFixture(t, name)
			var ins []*core.Tensor
			for _, tf := range f.Inputs {
				x := loadTensor(t, tf)
				defer x.Close()
				ins = append(ins, x)
			}
			outs, err := m.Forward(ins...)
			require.NoError(t, err)
			defer core.CloseAll(outs)
			require.Len(t, outs, len(f.Outputs))
			for i, tf := range f.Outputs {
				want := loadTensor(t, tf)
				defer want.Close()
				assert.LessOrEqual(t, maxAbsDiff(t, want, outs[i]), 1e-6, "output %d", i)
			}
		})
	}
}

func TestModuleMetadata(t *testing.T) {
	m, _ := loadFixture(t, "two_inputs")
	assert.Equal(t, []core.Arg{{Name: "features", Type: "Tensor"}, {Name: "scale", Type: "Tensor"}}, m.Inputs())
	assert.Equal(t, "Tuple[Tensor, Tuple[Tensor, Tensor]]", m.OutputType())
	assert.Contains(t, m.Schema(), "forward(")
	assert.Equal(t, int64(4*2+2), m.NumParameters())
	assert.Equal(t, int64(10*4), m.ParameterBytes())

	mlp, _ := loadFixture(t, "mlp")
	assert.Equal(t, []core.Arg{{Name: "x", Type: "Tensor"}}, mlp.Inputs())
	assert.Equal(t, "Tensor", mlp.OutputType())
}

func TestLoadBytesAndSaveRoundTrip(t *testing.T) {
	f := fixtures["mlp"]
	raw, err := os.ReadFile(fixturePath(f.File))
	require.NoError(t, err)
	m, err := core.LoadModuleBytes(raw)
	require.NoError(t, err)
	defer m.Close()

	// Kiln saves; Python torch loads and computes the same outputs.
	out := filepath.Join(t.TempDir(), "saved by kiln.pt")
	require.NoError(t, m.Save(out))
	x := loadTensor(t, f.Inputs[0])
	defer x.Close()
	got, err := m.Forward(x)
	require.NoError(t, err)
	defer core.CloseAll(got)
	vals, err := core.Data[float32](got[0])
	require.NoError(t, err)

	script := `
import sys, numpy, torch
m = torch.jit.load(sys.argv[1])
x = torch.from_numpy(numpy.fromfile(sys.argv[2], dtype=numpy.float32).reshape(5, 8))
with torch.no_grad():
    for v in m(x).flatten().tolist():
        print(repr(v))
`
	cmd := exec.Command(testkit.Python(t), "-c", script, out, fixturePath(f.Inputs[0].File))
	stdout, err := cmd.Output()
	require.NoError(t, err, "torch.jit.load of Kiln's file")
	sc := bufio.NewScanner(strings.NewReader(string(stdout)))
	i := 0
	for sc.Scan() {
		v, err := strconv.ParseFloat(sc.Text(), 64)
		require.NoError(t, err)
		require.Less(t, i, len(vals))
		assert.InDelta(t, v, float64(vals[i]), 1e-6, "element %d", i)
		i++
	}
	assert.Equal(t, len(vals), i)
}

// expectForwardError runs a bad forward pass and checks that the module
// still serves a good one afterwards.
func expectForwardError(t *testing.T, m *core.Module, good []*core.Tensor, contains string, bad ...*core.Tensor) {
	t.Helper()
	outs, err := m.Forward(bad...)
	require.Error(t, err)
	assert.Nil(t, outs)
	assert.Contains(t, err.Error(), contains)
	outs, err = m.Forward(good...)
	require.NoError(t, err, "module must keep serving after a bad call")
	core.CloseAll(outs)
}

func TestBadInputReturnsErrors(t *testing.T) {
	m, f := loadFixture(t, "mlp")
	good := loadTensor(t, f.Inputs[0])
	defer good.Close()
	ok := []*core.Tensor{good}

	mk := func(x *core.Tensor, err error) *core.Tensor {
		t.Helper()
		require.NoError(t, err)
		t.Cleanup(func() { x.Close() })
		return x
	}
	scalar := mk(core.Scalar(float32(1)))
	wrongDType := mk(core.Zeros(core.Int64, 5, 8))
	wrongWidth := mk(core.Zeros(core.Float32, 5, 7))
	zeroWidth := mk(core.Zeros(core.Float32, 5, 0))

	t.Run("wrong rank", func(t *testing.T) { expectForwardError(t, m, ok, "1D", scalar) })
	t.Run("wrong dtype", func(t *testing.T) { expectForwardError(t, m, ok, "dtype", wrongDType) })
	t.Run("wrong width", func(t *testing.T) { expectForwardError(t, m, ok, "5x7", wrongWidth) })
	t.Run("zero-sized dim", func(t *testing.T) { expectForwardError(t, m, ok, "5x0", zeroWidth) })
	t.Run("too many inputs", func(t *testing.T) { expectForwardError(t, m, ok, "argument", good, good) })
	t.Run("no inputs", func(t *testing.T) { expectForwardError(t, m, ok, "x") })
	t.Run("error names the inputs", func(t *testing.T) { expectForwardError(t, m, ok, "float32[5 7]", wrongWidth) })

	two, tf := loadFixture(t, "two_inputs")
	a, b := loadTensor(t, tf.Inputs[0]), loadTensor(t, tf.Inputs[1])
	defer a.Close()
	defer b.Close()
	vec := mk(core.Zeros(core.Float32, 4))
	t.Run("wrong rank two inputs", func(t *testing.T) {
		expectForwardError(t, two, []*core.Tensor{a, b}, "Dimension out of range", vec, b)
	})

	closed := mk(core.Zeros(core.Float32, 5, 8))
	closed.Close()
	t.Run("closed input", func(t *testing.T) { expectForwardError(t, m, ok, "closed", closed) })

	dict, _ := loadFixture(t, "returns_dict")
	x := mk(core.Zeros(core.Float32, 2))
	_, err := dict.Forward(x)
	assert.ErrorContains(t, err, "GenericDict")
}

func TestBadModelFiles(t *testing.T) {
	dir := t.TempDir()
	_, err := core.LoadModule(filepath.Join(dir, "missing.pt"))
	assert.ErrorContains(t, err, "missing.pt")
	assert.ErrorIs(t, err, os.ErrNotExist)

	garbage := filepath.Join(dir, "garbage.pt")
	require.NoError(t, os.WriteFile(garbage, []byte("this is not a torchscript archive"), 0o644))
	_, err = core.LoadModule(garbage)
	assert.ErrorContains(t, err, "garbage.pt")

	raw, err := os.ReadFile(fixturePath(fixtures["mlp"].File))
	require.NoError(t, err)
	truncated := filepath.Join(dir, "truncated.pt")
	require.NoError(t, os.WriteFile(truncated, raw[:len(raw)/2], 0o644))
	_, err = core.LoadModule(truncated)
	assert.ErrorContains(t, err, "truncated.pt")

	_, err = core.LoadModuleBytes(raw[:100])
	assert.Error(t, err)
	_, err = core.LoadModuleBytes(nil)
	assert.ErrorContains(t, err, "no bytes")

	// The process lives on and loads a good model afterwards.
	m, err := core.LoadModuleBytes(raw)
	require.NoError(t, err)
	m.Close()
}

func TestClosedModule(t *testing.T) {
	m, err := core.LoadModule(fixturePath(fixtures["mlp"].File))
	require.NoError(t, err)
	require.NoError(t, m.Close())
	require.NoError(t, m.Close())
	x, err := core.Zeros(core.Float32, 1, 8)
	require.NoError(t, err)
	defer x.Close()
	_, err = m.Forward(x)
	assert.ErrorIs(t, err, core.ErrClosed)
}

func TestConcurrentForward(t *testing.T) {
	m, f := loadFixture(t, "mlp")
	x := loadTensor(t, f.Inputs[0])
	defer x.Close()
	want := loadTensor(t, f.Outputs[0])
	defer want.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				outs, err := m.Forward(x)
				if err != nil {
					errs <- err
					return
				}
				d := maxAbsDiff(t, want, outs[0])
				core.CloseAll(outs)
				if d > 1e-6 {
					errs <- fmt.Errorf("diff %g", d)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func rssBytes(t *testing.T) int64 {
	raw, err := os.ReadFile("/proc/self/statm")
	require.NoError(t, err)
	fields := strings.Fields(string(raw))
	pages, err := strconv.ParseInt(fields[1], 10, 64)
	require.NoError(t, err)
	return pages * int64(os.Getpagesize())
}

// TestRSSFlatOverManyCycles: 100,000 create/forward/free cycles must not
// grow resident memory by more than 10%.
func TestRSSFlatOverManyCycles(t *testing.T) {
	if testing.Short() {
		t.Skip("long: 100,000 cycles")
	}
	m, _ := loadFixture(t, "mlp")
	in := make([]float32, 4*8)
	for i := range in {
		in[i] = float32(i) / 32
	}
	cycle := func() {
		x, err := core.NewTensor(in, 4, 8)
		if err != nil {
			t.Fatal(err)
		}
		outs, err := m.Forward(x)
		if err != nil {
			t.Fatal(err)
		}
		core.CloseAll(outs)
		x.Close()
	}
	for i := 0; i < 5000; i++ {
		cycle()
	}
	before := rssBytes(t)
	for i := 0; i < 100_000; i++ {
		cycle()
	}
	after := rssBytes(t)
	t.Logf("RSS before %.1f MiB, after 100,000 cycles %.1f MiB", float64(before)/(1<<20), float64(after)/(1<<20))
	assert.LessOrEqual(t, float64(after), float64(before)*1.10, "RSS grew more than 10%%")
}
