package bindings

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
)

// mlp saves an 8→10→1 network and loads it as Python does.
func mlp(tb testing.TB) *Model {
	tb.Helper()
	net, err := nn.Build(nn.Sequential(nn.Linear(10), nn.Layer{Type: "relu"}, nn.Linear(1)), 8, 1)
	if err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(tb.TempDir(), "mlp.pt")
	if err := net.Save(path); err != nil {
		tb.Fatal(err)
	}
	net.Close()
	m, err := LoadModel(path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(m.Close)
	return m
}

func addrOf[T any](s []T) uint64 { return uint64(uintptr(unsafe.Pointer(&s[0]))) }

// cMem returns vals copied into C memory (libtorch's), which neither Go's
// stack moves nor its collector frees while Go code holds only its address.
func cMem[T core.Element](tb testing.TB, vals ...T) []T {
	t, err := core.NewTensor(vals)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { t.Close() })
	p, err := t.DataPtr()
	if err != nil {
		tb.Fatal(err)
	}
	return unsafe.Slice((*T)(p), len(vals))
}

func cFloats(tb testing.TB, n int) []float32 { return cMem(tb, make([]float32, n)...) }

func predictSlow(tb testing.TB, m *Model, x []float32, rows int) []float32 {
	spec, _ := json.Marshal([]tensorRef{{Addr: addrOf(x), DType: "float32", Shape: []int64{int64(rows), 8}}})
	out, err := m.Predict(string(spec))
	if err != nil {
		tb.Fatal(err)
	}
	defer out.Close()
	a, err := out.Addr(0)
	if err != nil {
		tb.Fatal(err)
	}
	return append([]float32(nil), unsafe.Slice((*float32)(unsafePtr(a)), rows)...)
}

func unsafePtr(a uint64) unsafe.Pointer { return unsafe.Add(nil, uintptr(a)) }

func TestPredictIntoMatchesPredict(t *testing.T) {
	m := mlp(t)
	x := cFloats(t, 3*8)
	for i := range x {
		x[i] = float32(i%7) - 3
	}
	want := predictSlow(t, m, x, 3)
	f32 := int64(DTypeCode("float32"))
	desc := cMem(t, []int64{1, 1, f32, 2, 3, 8, f32, 2, 3, 1}...)
	got := cFloats(t, 3)
	rc, err := m.PredictInto(addrOf(desc), addrOf(x), addrOf(got))
	if err != nil || rc != PredictDone {
		t.Fatalf("PredictInto = %d, %v", rc, err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("PredictInto wrote %v, Predict gave %v", got, want)
	}
	// A descriptor whose output shape is wrong writes nothing.
	bad := cMem(t, []int64{1, 1, f32, 2, 3, 8, f32, 2, 3, 2}...)
	got2 := cFloats(t, 6)
	if rc, err := m.PredictInto(addrOf(bad), addrOf(x), addrOf(got2)); err != nil || rc != PredictMismatch {
		t.Fatalf("mismatched shape: PredictInto = %d, %v", rc, err)
	}
	for _, v := range got2 {
		if v != 0 {
			t.Fatalf("mismatch wrote %v", got2)
		}
	}
	// A wrong input width is the model's error, with libtorch's message.
	wide := cMem(t, []int64{1, 1, f32, 2, 3, 4, f32, 2, 3, 1}...)
	if _, err := m.PredictInto(addrOf(wide), addrOf(x), addrOf(got)); err == nil {
		t.Fatal("3x4 input to an 8-feature model: no error")
	}
	// A bad dtype code is an error, not a crash.
	junk := cMem(t, []int64{1, 1, 99, 2, 3, 8, f32, 2, 3, 1}...)
	if _, err := m.PredictInto(addrOf(junk), addrOf(x), addrOf(got)); err == nil {
		t.Fatal("dtype code 99: no error")
	}
}

func BenchmarkPredictOneRow(b *testing.B) {
	m := mlp(b)
	x := cFloats(b, 8)
	spec, _ := json.Marshal([]tensorRef{{Addr: addrOf(x), DType: "float32", Shape: []int64{1, 8}}})
	b.Run("Predict", func(b *testing.B) {
		for b.Loop() {
			out, err := m.Predict(string(spec))
			if err != nil {
				b.Fatal(err)
			}
			out.Close()
		}
	})
	b.Run("PredictInto", func(b *testing.B) {
		f32 := int64(DTypeCode("float32"))
		desc := cMem(b, []int64{1, 1, f32, 2, 1, 8, f32, 2, 1, 1}...)
		y := cFloats(b, 1)
		for b.Loop() {
			if rc, err := m.PredictInto(addrOf(desc), addrOf(x), addrOf(y)); err != nil || rc != PredictDone {
				b.Fatal(rc, err)
			}
		}
	})
	b.Run("Forward", func(b *testing.B) {
		t, _ := core.FromBlob(unsafe.Pointer(&x[0]), core.Float32, []int64{1, 8}, nil, nil)
		defer t.Close()
		for b.Loop() {
			outs, err := m.m.Forward(t)
			if err != nil {
				b.Fatal(err)
			}
			core.CloseAll(outs)
		}
	})
}
