package core_test

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
)

// TestLiveTensorsCountsHandles: making a tensor, a second handle to it,
// and a forward pass's outputs each raise core.LiveTensors by their
// number of handles; closing them (and a failed forward pass) brings it
// back exactly.
//
// The count is process-wide: a tensor another test forgot could be
// released by its cleanup in the middle of a check. The collector is off
// during the test (no new cleanups are queued) and a check that sees a
// count moved by such a cleanup runs again; one that is wrong three times
// is a counting bug.
func TestLiveTensorsCountsHandles(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	runtime.GC()
	m, f := loadFixture(t, "mlp")
	x := loadTensor(t, f.Inputs[0])
	defer x.Close()
	bad, err := core.NewTensor([]float32{1, 2, 3}, 1, 3) // mlp wants [n, 8]
	require.NoError(t, err)
	defer bad.Close()

	check := func() error {
		base := core.LiveTensors()
		want := func(step string, n int64) error {
			if got := core.LiveTensors() - base; got != n {
				return fmt.Errorf("%s: live tensors moved by %d, want %d", step, got, n)
			}
			return nil
		}
		a, err := core.NewTensor([]float32{1, 2, 3, 4}, 2, 2)
		require.NoError(t, err)
		if err := want("NewTensor", 1); err != nil {
			a.Close()
			return err
		}
		b, err := a.Contiguous() // a second handle to the same storage
		require.NoError(t, err)
		defer b.Close()
		defer a.Close()
		if err := want("Contiguous", 2); err != nil {
			return err
		}
		outs, err := m.Forward(x)
		require.NoError(t, err)
		require.NotEmpty(t, outs)
		if err := want("Forward", 2+int64(len(outs))); err != nil {
			core.CloseAll(outs)
			return err
		}
		core.CloseAll(outs)
		if err := want("closing the outputs", 2); err != nil {
			return err
		}
		_, err = m.Forward(bad)
		require.Error(t, err)
		if err := want("a failed Forward", 2); err != nil {
			return err
		}
		require.NoError(t, b.Close())
		require.NoError(t, a.Close())
		return want("closing both", 0)
	}
	var errs []error
	for range 3 {
		err := check()
		if err == nil {
			return
		}
		errs = append(errs, err)
	}
	t.Fatalf("live tensor count wrong in three tries: %v", errs)
}
