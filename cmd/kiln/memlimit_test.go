package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func writeFile(t *testing.T, p, s string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
	require.NoError(t, os.WriteFile(p, []byte(s), 0o644))
}

// The smallest limit of the cgroup and its ancestors counts; "max" and
// v1's "unlimited" (2^63-1 rounded to a page) are no limit.
func TestCgroupMemoryLimit(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "memory.max"), "max\n")
	writeFile(t, filepath.Join(root, "a", "memory.max"), "3221225472\n")
	writeFile(t, filepath.Join(root, "a", "b", "memory.max"), "max\n")
	n, where := cgroupMemoryLimit([]byte("0::/a/b\n"), root)
	assert.EqualValues(t, 3<<30, n)
	assert.Equal(t, filepath.Join(root, "a", "memory.max"), where)

	writeFile(t, filepath.Join(root, "memory", "memory.limit_in_bytes"), "9223372036854771712\n")
	writeFile(t, filepath.Join(root, "memory", "x", "y", "memory.limit_in_bytes"), "2147483648\n")
	n, _ = cgroupMemoryLimit([]byte("4:memory:/x/y\n1:cpu:/\n0::/\n"), root)
	assert.EqualValues(t, 2<<30, n, "v1 when v2 has no limit")

	n, _ = cgroupMemoryLimit([]byte("0::/\n"), root)
	assert.Zero(t, n, "max: no limit")
	n, _ = cgroupMemoryLimit([]byte("4:memory:/\n"), root)
	assert.Zero(t, n, "v1 unlimited")
	n, _ = cgroupMemoryLimit([]byte("garbage"), root)
	assert.Zero(t, n)
}
