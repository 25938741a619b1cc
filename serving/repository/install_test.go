package repository

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/testkit"
)

// TestInstallAsVersion: Install takes the next free version by default and
// exactly InstallOptions.Version when given (a registry's number); a
// version that exists is ALREADY_EXISTS and leaves nothing behind.
func TestInstallAsVersion(t *testing.T) {
	pkg := filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", "v1-float")
	repo := t.TempDir()
	in, err := Install(repo, "m", pkg, InstallOptions{})
	require.NoError(t, err)
	assert.Equal(t, int64(1), in.Version)
	assert.True(t, in.ConfigCreated)

	in, err = Install(repo, "m", pkg, InstallOptions{Version: 7})
	require.NoError(t, err)
	assert.Equal(t, int64(7), in.Version)
	assert.Equal(t, filepath.Join(repo, "m", "7"), in.Dir)
	assert.FileExists(t, filepath.Join(repo, "m", "7", "model.pt"))

	in, err = Install(repo, "m", pkg, InstallOptions{})
	require.NoError(t, err)
	assert.Equal(t, int64(8), in.Version, "the next free number follows the highest")

	_, err = Install(repo, "m", pkg, InstallOptions{Version: 7})
	require.Error(t, err)
	assert.Equal(t, core.AlreadyExists, core.CodeOf(err), "%v", err)
	require.NoError(t, os.MkdirAll(filepath.Join(repo, "m", "9"), 0o755)) // empty: rename(2) would replace it
	_, err = Install(repo, "m", pkg, InstallOptions{Version: 9})
	assert.Equal(t, core.AlreadyExists, core.CodeOf(err), "%v", err)
	_, err = Install(repo, "m", pkg, InstallOptions{Version: -1})
	assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)

	entries, err := os.ReadDir(filepath.Join(repo, "m"))
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"1", "7", "8", "9", "config.yaml", "labels.txt"}, names, "no staging directory is left")

	r, err := Open(repo)
	require.NoError(t, err)
	m, err := r.Model("m")
	require.NoError(t, err)
	assert.Equal(t, []int64{1, 7, 8, 9}, m.Versions)
}

// TestFailedInstallLeavesNothing: staging happens at the repository's top,
// in a hidden directory, so that a package that is never installed leaves
// no model directory; an install that fails for a model new to the
// repository removes the directory and config it made.
func TestFailedInstallLeavesNothing(t *testing.T) {
	pkg := filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", "v1-float")
	repo := t.TempDir()
	ls := func() []string {
		entries, err := os.ReadDir(repo)
		require.NoError(t, err)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return names
	}
	tmp, err := NewStaging(repo, "n")
	require.NoError(t, err)
	assert.Equal(t, repo, filepath.Dir(tmp))
	assert.NoDirExists(t, filepath.Join(repo, "n"), "staging makes no model directory")
	require.NoError(t, os.RemoveAll(tmp))

	// Fails after the config was written (the version is refused), by
	// copy and by move.
	_, err = Install(repo, "n", pkg, InstallOptions{Version: -1})
	assert.Equal(t, core.InvalidArgument, core.CodeOf(err), "%v", err)
	assert.Empty(t, ls())
	staged, err := NewStaging(repo, "n")
	require.NoError(t, err)
	_, err = modelpkg.Copy(pkg, staged)
	require.NoError(t, err)
	_, err = Install(repo, "n", staged, InstallOptions{Version: -1, Move: true})
	require.Error(t, err)
	require.NoError(t, os.RemoveAll(staged))
	assert.Empty(t, ls())

	_, err = Install(repo, "../n", pkg, InstallOptions{})
	require.Error(t, err)
	assert.Empty(t, ls())

	// An existing model keeps what it had.
	_, err = Install(repo, "m", pkg, InstallOptions{})
	require.NoError(t, err)
	_, err = Install(repo, "m", pkg, InstallOptions{Version: -1})
	require.Error(t, err)
	assert.Equal(t, []string{"m"}, ls())
	assert.FileExists(t, filepath.Join(repo, "m", "config.yaml"))
}
