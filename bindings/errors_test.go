package bindings

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnml/kiln/core"
)

// Every error an exported function returns starts with its code's tag,
// which python/kiln/_errors.py reads; the tag is written once, and the
// error still unwraps to what it wraps.
func TestErrorsCarryTheirCodeTag(t *testing.T) {
	dir := t.TempDir()
	_, err := LoadModel(filepath.Join(dir, "missing.pt"))
	if err == nil || !strings.HasPrefix(err.Error(), "[KILN_NOT_FOUND] ") {
		t.Fatalf("missing file: %v", err)
	}
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the tagged error does not unwrap to os.ErrNotExist: %v", err)
	}

	// A file whose name holds other kinds' words fails as what it is.
	bad := filepath.Join(dir, "[KILN_NOT_FOUND] not found out of memory.pt")
	if err := os.WriteFile(bad, []byte("not a zip"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = LoadModel(bad)
	if err == nil || !strings.HasPrefix(err.Error(), "[KILN_INVALID_ARGUMENT] ") {
		t.Fatalf("garbage file: %v", err)
	}

	m := mlp(t)
	_, err = m.Predict(`[{"addr": 1, "dtype": "complex", "shape": [2]}]`)
	if err == nil || !strings.HasPrefix(err.Error(), "[KILN_INVALID_ARGUMENT] ") {
		t.Fatalf("bad dtype: %v", err)
	}

	if got := tagged(tagged(core.Errorf(core.Cancelled, "stop"))).Error(); got != "[KILN_CANCELLED] stop" {
		t.Errorf("tagged twice: %q", got)
	}
	if tagged(nil) != nil {
		t.Error("tagged(nil) is not nil")
	}
}

// A recovered panic is INTERNAL.
func TestPanicIsInternal(t *testing.T) {
	f := func() (err error) {
		defer guard(&err)
		var m map[string]int
		m["x"] = 1 // panics
		return nil
	}
	err := f()
	if err == nil || !strings.HasPrefix(err.Error(), "[KILN_INTERNAL] kiln: internal error: ") {
		t.Fatalf("got %v", err)
	}
	if core.CodeOf(err) != core.Internal {
		t.Errorf("code %v", core.CodeOf(err))
	}
}
