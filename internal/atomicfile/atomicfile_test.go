package atomicfile_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnml/kiln/internal/atomicfile"
	"github.com/stretchr/testify/require"
)

func TestWriteFileReplacesAndSetsPerm(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	require.NoError(t, os.WriteFile(path, []byte("old"), 0o600))
	require.NoError(t, atomicfile.WriteFile(path, []byte("new"), 0o644))
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, "new", string(b))
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o644), st.Mode().Perm())
	requireNoTemp(t, dir)
}

func TestWriteFailureLeavesTheOldContent(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "model.pt")
	require.NoError(t, os.WriteFile(path, []byte("old"), 0o644))
	boom := errors.New("save failed")
	err := atomicfile.Write(path, 0o644, func(tmp string) error {
		require.True(t, strings.HasPrefix(filepath.Base(tmp), atomicfile.TempPrefix), tmp)
		require.NoError(t, os.WriteFile(tmp, []byte("half"), 0o644))
		return boom
	})
	require.ErrorIs(t, err, boom)
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, "old", string(b))
	requireNoTemp(t, dir)

	require.NoError(t, atomicfile.Write(path, 0o640, func(tmp string) error { return os.WriteFile(tmp, []byte("saved"), 0o600) }))
	b, err = os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, "saved", string(b))
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o640), st.Mode().Perm())
}

func TestWriteFileIntoAMissingDirectoryFails(t *testing.T) {
	err := atomicfile.WriteFile(filepath.Join(t.TempDir(), "absent", "f"), []byte("x"), 0o644)
	require.ErrorIs(t, err, os.ErrNotExist)
}

func requireNoTemp(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range ents {
		require.False(t, strings.HasPrefix(e.Name(), atomicfile.TempPrefix), "left behind: %s", e.Name())
	}
}

func ExampleWriteFile() {
	dir, _ := os.MkdirTemp("", "atomicfile-example-")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "latest")
	_ = atomicfile.WriteFile(path, []byte("epoch-0003\n"), 0o644)
	b, _ := os.ReadFile(path)
	os.Stdout.Write(b)
	// Output: epoch-0003
}
