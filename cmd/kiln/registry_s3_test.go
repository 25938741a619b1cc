package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/kilnenv"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/registry"
)

// TestRegistryArtifactsOnS3: the cluster setup from the command line, a
// PostgreSQL registry with its artifacts in S3 (versitygw): kiln registry
// and kiln fetch models:/NAME@ALIAS read it with --registry-artifacts or
// $KILN_REGISTRY_ARTIFACTS; a corrupt object and a missing bucket get
// their exit statuses.
func TestRegistryArtifactsOnS3(t *testing.T) {
	srv := testkit.S3(t)
	srv.Setenv(t)
	srv.CreateBucket(t, "kiln")
	t.Setenv(kilnenv.Home, t.TempDir())
	t.Setenv(kilnenv.Registry, "")
	t.Setenv(kilnenv.RegistryArtifacts, "")
	t.Setenv(kilnenv.RegistryKey, "")
	t.Setenv(kilnenv.RegistryKeyFile, "")
	ctx := context.Background()
	dsn := testkit.PostgreSQL(t)
	const root = "s3://kiln/shared"

	// One server registers and promotes ...
	pkgDir := filepath.Join(t.TempDir(), "iris")
	_, err := modelpkg.Copy(filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", "v1-int8"), pkgDir)
	require.NoError(t, err)
	reg, err := registry.Open(ctx, dsn, registry.Options{ArtifactDir: root})
	require.NoError(t, err)
	v, err := reg.RegisterVersion(ctx, "iris", pkgDir, registry.RegisterOptions{Actor: "ci"})
	require.NoError(t, err)
	_, err = reg.CompareAndSwap(ctx, registry.Move{Model: "iris", Alias: "production", Expected: 0, To: v.Version, Actor: "ci"})
	require.NoError(t, err)
	require.NoError(t, reg.Close())

	// ... another reads it.
	out, err := runKiln(t, "registry", "ls", "--registry", dsn, "--registry-artifacts", root)
	require.NoError(t, err, out)
	assert.Contains(t, out, "iris")
	dst := filepath.Join(t.TempDir(), "mnt", "models")
	out, err = runKiln(t, "fetch", "models:/iris@production", dst, "--registry", dsn, "--registry-artifacts", root)
	require.NoError(t, err, out)
	want, _ := os.ReadFile(filepath.Join(pkgDir, modelpkg.ModelFile))
	have, err := os.ReadFile(filepath.Join(dst, modelpkg.ModelFile))
	require.NoError(t, err)
	assert.Equal(t, want, have)

	t.Setenv(kilnenv.Registry, dsn)
	t.Setenv(kilnenv.RegistryArtifacts, root)
	out, err = runKiln(t, "fetch", "models:/iris/1", filepath.Join(t.TempDir(), "env"))
	require.NoError(t, err, out)
	assert.Contains(t, out, "sha256:"+v.Digest)

	// A corrupt object: exit 4, nothing fetched.
	srv.PutObject(t, "kiln", "shared/sha256/"+v.Digest, "not the archive")
	bad := filepath.Join(t.TempDir(), "bad")
	out, err = runKiln(t, "fetch", "models:/iris@production", bad)
	require.Error(t, err, out)
	assert.Equal(t, exitIntegrity, exitCode(err), err.Error())
	assert.NoFileExists(t, filepath.Join(bad, modelpkg.ModelFile))

	// A missing bucket: exit 3, naming the bucket.
	out, err = runKiln(t, "fetch", "models:/iris@production", filepath.Join(t.TempDir(), "nb"), "--registry-artifacts", "s3://absent/x")
	require.Error(t, err, out)
	assert.Equal(t, exitNotFound, exitCode(err), err.Error())
	assert.Contains(t, err.Error(), `bucket "absent" does not exist`)
}
