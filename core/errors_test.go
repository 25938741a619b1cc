package core_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
)

// The codes libtorch's failures come back with across the C ABI.
func TestNativeErrorCodes(t *testing.T) {
	m, f := loadFixture(t, "mlp")
	good := loadTensor(t, f.Inputs[0])
	defer good.Close()

	t.Run("forward with a wrong shape is INVALID_ARGUMENT", func(t *testing.T) {
		x, err := core.Zeros(core.Float32, 5, 7)
		require.NoError(t, err)
		defer x.Close()
		_, err = m.Forward(x)
		require.Error(t, err)
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
		var ce *core.Error
		require.True(t, errors.As(err, &ce), "the C error is a *core.Error")
		assert.Contains(t, ce.Message, "5x7")
	})
	t.Run("forward with too many inputs is INVALID_ARGUMENT", func(t *testing.T) {
		_, err := m.Forward(good, good)
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
	})

	dir := t.TempDir()
	t.Run("a missing file is NOT_FOUND", func(t *testing.T) {
		_, err := core.LoadModule(filepath.Join(dir, "missing.pt"))
		assert.Equal(t, core.NotFound, core.CodeOf(err), "%v", err)
	})
	t.Run("a corrupt file is INVALID_ARGUMENT, whatever its name says", func(t *testing.T) {
		bad := filepath.Join(dir, "not found out of memory.pt")
		require.NoError(t, os.WriteFile(bad, []byte("not a zip"), 0o644))
		_, err := core.LoadModule(bad)
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
		_, err = core.LoadModuleBytes([]byte("not a zip"))
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
	})
	t.Run("a bad shape is INVALID_ARGUMENT", func(t *testing.T) {
		_, err := core.Zeros(core.Float32, 2, -1)
		assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
	})
	t.Run("a closed handle is FAILED_PRECONDITION", func(t *testing.T) {
		x, err := core.Zeros(core.Float32, 2, 8)
		require.NoError(t, err)
		x.Close()
		_, err = m.Forward(x)
		assert.Equal(t, core.FailedPrecondition, core.CodeOf(err), "%v", err)
		assert.ErrorIs(t, err, core.ErrClosed)
	})
	t.Run("libtorch failing to allocate is OUT_OF_MEMORY", func(t *testing.T) {
		// 2^42 float32 elements (16 TiB): the allocation fails at once
		// unless the kernel overcommits without limit, where touching the
		// zeros would summon the OOM killer instead.
		if b, err := os.ReadFile("/proc/sys/vm/overcommit_memory"); err != nil || strings.TrimSpace(string(b)) == "1" {
			t.Skip("vm.overcommit_memory is 1 (or unknown): a huge allocation would not fail")
		}
		_, err := core.Zeros(core.Float32, 1<<42)
		require.Error(t, err)
		assert.Equal(t, core.OutOfMemory, core.CodeOf(err), "%v", err)
	})
}

func TestCodeOf(t *testing.T) {
	assert.Equal(t, core.Unknown, core.CodeOf(nil))
	assert.Equal(t, core.Unknown, core.CodeOf(errors.New("plain")))
	assert.Equal(t, core.Cancelled, core.CodeOf(fmt.Errorf("fit: %w", context.Canceled)))
	assert.Equal(t, core.DeadlineExceeded, core.CodeOf(fmt.Errorf("fit: %w", context.DeadlineExceeded)))
	assert.Equal(t, core.NotFound, core.CodeOf(fmt.Errorf("open: %w", os.ErrNotExist)))
	// The outermost code wins.
	inner := core.Errorf(core.OutOfMemory, "alloc")
	outer := fmt.Errorf("%w: %w", core.Errorf(core.Internal, "wrapper"), inner)
	assert.Equal(t, core.Internal, core.CodeOf(outer))
	assert.Equal(t, core.OutOfMemory, core.CodeOf(fmt.Errorf("ctx: %w", inner)))
	// errors.Is asks for a kind with a message-less *Error.
	assert.ErrorIs(t, fmt.Errorf("ctx: %w", inner), &core.Error{Code: core.OutOfMemory})
	assert.NotErrorIs(t, inner, &core.Error{Code: core.NotFound})
	assert.Equal(t, "INVALID_ARGUMENT", core.InvalidArgument.String())
	assert.True(t, core.HasCode(inner, core.OutOfMemory))
}
