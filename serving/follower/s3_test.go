package follower

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/registry"
)

// TestFollowRegistryOnS3: a server follows a shared registry (PostgreSQL,
// artifacts encrypted in S3 on a versitygw server) that another process
// writes: it serves the alias's version, and a corrupt object for the
// next version is refused while the previous one keeps serving.
func TestFollowRegistryOnS3(t *testing.T) {
	srv := testkit.S3(t)
	srv.Setenv(t)
	srv.CreateBucket(t, "kiln")
	ctx := context.Background()
	dsn := testkit.PostgreSQL(t)
	key, err := registry.ParseKey([]byte(strings.Repeat("5a", 32)))
	require.NoError(t, err)
	opts := registry.Options{ArtifactDir: "s3://kiln/artifacts", Key: key}

	writer, err := registry.Open(ctx, dsn, opts)
	require.NoError(t, err)
	defer writer.Close()
	var digests []string
	for _, p := range []string{pkg(t, "v1-float", "a"), pkg(t, "v1-float", "b")} {
		v, err := writer.RegisterVersion(ctx, "m", p, registry.RegisterOptions{Actor: "trainer"})
		require.NoError(t, err)
		digests = append(digests, v.Digest)
	}

	reader, err := registry.Open(ctx, dsn, opts)
	require.NoError(t, err)
	defer reader.Close()
	repo := filepath.Join(t.TempDir(), "repo")
	require.NoError(t, os.MkdirAll(repo, 0o755))
	x := newFixture(t, reader, repo)
	x.move(t, 0, 1)
	require.NoError(t, x.f.Sync(ctx))
	assert.Equal(t, int64(1), x.serving(t))
	require.NoError(t, infer(x.mgr))

	srv.PutObject(t, "kiln", "artifacts/sha256/"+digests[1], "KILNENC1 but not what was sealed")
	x.move(t, 1, 2)
	err = x.f.Sync(ctx)
	require.Error(t, err)
	assert.ErrorIs(t, err, registry.ErrDigestMismatch)
	assert.Equal(t, int64(1), x.serving(t), "the previous version keeps serving")
	require.NoError(t, infer(x.mgr))
}
