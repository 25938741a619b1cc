package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/internal/testkit"
)

// localModel writes a model directory: a config and versions 1 and 2.
func localModel(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mlp")
	for p, body := range map[string]string{"config.yaml": "max_batch_size: 4\n", "1/model.pt": "one", "2/model.pt": "two", "2/extra/w.bin": "weights"} {
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, p), []byte(body), 0o644))
	}
	return dir
}

func runKiln(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestRepositoryPushAndFetch(t *testing.T) {
	srv := testkit.S3(t)
	srv.Setenv(t)
	srv.CreateBucket(t, "models")
	out, err := runKiln(t, "repository", "push", localModel(t), "s3://models/repo")
	require.NoError(t, err, out)
	assert.Contains(t, out, "pushed")
	assert.Contains(t, out, "versions 1,2")

	// A whole model, as a KServe storage initializer would.
	dst := filepath.Join(t.TempDir(), "mnt", "models")
	out, err = runKiln(t, "fetch", "s3://models/repo/mlp", dst)
	require.NoError(t, err, out)
	assert.Contains(t, out, "3 verified against a manifest")
	for p, body := range map[string]string{"config.yaml": "max_batch_size: 4\n", "1/model.pt": "one", "2/model.pt": "two", "2/extra/w.bin": "weights"} {
		b, err := os.ReadFile(filepath.Join(dst, p))
		require.NoError(t, err, p)
		assert.Equal(t, body, string(b), p)
	}
	left, err := filepath.Glob(filepath.Join(dst, ".kiln-fetch-*"))
	require.NoError(t, err)
	assert.Empty(t, left)

	// One object.
	one := t.TempDir()
	out, err = runKiln(t, "fetch", "s3://models/repo/mlp/2/model.pt", one)
	require.NoError(t, err, out)
	b, err := os.ReadFile(filepath.Join(one, "model.pt"))
	require.NoError(t, err)
	assert.Equal(t, "two", string(b))

	// A local path.
	local := t.TempDir()
	out, err = runKiln(t, "fetch", "file://"+filepath.Join(dst, "2"), local)
	require.NoError(t, err, out)
	b, err = os.ReadFile(filepath.Join(local, "extra", "w.bin"))
	require.NoError(t, err)
	assert.Equal(t, "weights", string(b))

	// A half-uploaded version 3 is skipped.
	srv.PutObject(t, "models", "repo/mlp/3/model.pt", "partial")
	skip := t.TempDir()
	out, err = runKiln(t, "fetch", "s3://models/repo/mlp", skip)
	require.NoError(t, err, out)
	assert.Contains(t, out, "incomplete version")
	assert.NoDirExists(t, filepath.Join(skip, "3"))

	// A corrupt object: exit status 4, nothing of it in DST.
	srv.PutObject(t, "models", "repo/mlp/2/model.pt", "TWO")
	bad := t.TempDir()
	_, err = runKiln(t, "fetch", "s3://models/repo/mlp", bad)
	require.Error(t, err)
	assert.Equal(t, exitIntegrity, exitCode(err), err.Error())
	assert.Contains(t, err.Error(), "corrupt object")
	ents, _ := os.ReadDir(bad)
	assert.Empty(t, ents, "a failed fetch leaves DST as it was")

	// Nothing there, a missing bucket, a bad URI, an unsupported scheme.
	_, err = runKiln(t, "fetch", "s3://models/nothing-here", t.TempDir())
	assert.Equal(t, exitNotFound, exitCode(err), err)
	_, err = runKiln(t, "fetch", "s3://no-such-bucket/x", t.TempDir())
	assert.Equal(t, exitNotFound, exitCode(err), err)
	_, err = runKiln(t, "fetch", "s3://BAD/x", t.TempDir())
	assert.Equal(t, exitUsage, exitCode(err), err)
	_, err = runKiln(t, "fetch", "gs://bucket/x", t.TempDir())
	assert.Equal(t, exitUsage, exitCode(err), err)
	_, err = runKiln(t, "fetch", filepath.Join(t.TempDir(), "missing"), t.TempDir())
	assert.Equal(t, exitNotFound, exitCode(err), err)

	// Refused credentials, then an unreachable endpoint: status 5.
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
	_, err = runKiln(t, "fetch", "s3://models/repo/mlp", t.TempDir())
	require.Error(t, err)
	assert.Equal(t, exitAccess, exitCode(err), err.Error())
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
	srv.Stop()
	_, err = runKiln(t, "fetch", "s3://models/repo/mlp", t.TempDir())
	require.Error(t, err)
	assert.Equal(t, exitAccess, exitCode(err), err.Error())
}
