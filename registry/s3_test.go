package registry

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/testkit"
)

// s3Registry opens the PostgreSQL registry dsn with its artifacts at
// root (an s3:// URI) and o.
func s3Registry(t *testing.T, dsn, root string, o Options) *Registry {
	t.Helper()
	o.ArtifactDir = root
	r, err := Open(context.Background(), dsn, o)
	require.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	return r
}

func getObject(t *testing.T, c *s3.Client, bucket, key string) []byte {
	t.Helper()
	out, err := c.GetObject(context.Background(), &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	require.NoError(t, err)
	defer out.Body.Close()
	b, err := io.ReadAll(out.Body)
	require.NoError(t, err)
	return b
}

func putObject(t *testing.T, c *s3.Client, bucket, key string, body []byte) {
	t.Helper()
	_, err := c.PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: bytes.NewReader(body)})
	require.NoError(t, err)
}

// TestS3Artifacts is the cluster setup: a PostgreSQL registry whose
// artifacts are objects in an S3 bucket (a real versitygw server), shared
// by two registry handles as two servers would share it.
func TestS3Artifacts(t *testing.T) {
	srv := testkit.S3(t)
	srv.Setenv(t)
	srv.CreateBucket(t, "kiln")
	c := srv.Client()
	ctx := context.Background()
	dsn := testkit.PostgreSQL(t)
	const root = "s3://kiln/registry/artifacts"

	one := s3Registry(t, dsn, root, Options{})
	assert.Equal(t, root, one.ArtifactDir())
	p := pkg(t, "a")
	v, err := one.RegisterVersion(ctx, "iris", p, RegisterOptions{Actor: "alice"})
	require.NoError(t, err)
	key := "registry/artifacts/sha256/" + v.Digest
	archive, _, err := pack(p)
	require.NoError(t, err)
	assert.Equal(t, archive, getObject(t, c, "kiln", key), "the blob is the package's archive at <prefix>/sha256/<hex>")

	// A second server's handle fetches it.
	two := s3Registry(t, dsn, root, Options{})
	got, err := two.Resolve(ctx, "models:/iris/latest")
	require.NoError(t, err)
	out := filepath.Join(t.TempDir(), "pkg")
	_, err = two.Fetch(ctx, got.Ref(), out)
	require.NoError(t, err)
	want, _ := os.ReadFile(filepath.Join(p, modelpkg.ModelFile))
	have, _ := os.ReadFile(filepath.Join(out, modelpkg.ModelFile))
	assert.True(t, bytes.Equal(want, have))

	// A truncated object (an interrupted copy): refused on read, and
	// replaced when the same package is registered again.
	putObject(t, c, "kiln", key, archive[:len(archive)/2])
	_, err = two.Fetch(ctx, v.Ref(), filepath.Join(t.TempDir(), "t"))
	require.ErrorIs(t, err, ErrDigestMismatch)
	assert.ErrorContains(t, err, "s3://kiln/"+key+" was changed or is corrupt")
	v2, err := two.RegisterVersion(ctx, "iris", p, RegisterOptions{})
	require.NoError(t, err)
	assert.Equal(t, v.Digest, v2.Digest)
	assert.Equal(t, archive, getObject(t, c, "kiln", key), "a blob of the wrong size is uploaded again")
	_, err = one.Fetch(ctx, v.Ref(), filepath.Join(t.TempDir(), "again"))
	require.NoError(t, err)

	// A corrupt object of the right size: refused, never loaded.
	bad := bytes.Clone(archive)
	bad[len(bad)/2] ^= 0x20
	putObject(t, c, "kiln", key, bad)
	_, err = one.Fetch(ctx, v.Ref(), filepath.Join(t.TempDir(), "c"))
	require.ErrorIs(t, err, ErrDigestMismatch)
	code(t, err, core.Internal)
	_, err = c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String("kiln"), Key: aws.String(key)})
	require.NoError(t, err)
	_, err = one.Fetch(ctx, v.Ref(), filepath.Join(t.TempDir(), "m"))
	code(t, err, core.NotFound)
	assert.ErrorContains(t, err, "missing from "+root)

	// Encrypted blobs: no plaintext in the bucket; a key-holding second
	// handle reads them, one without the key is told so.
	k, err := ParseKey([]byte(strings.Repeat("cd", 32)))
	require.NoError(t, err)
	const encRoot = "s3://kiln/enc"
	enc := s3Registry(t, dsn, encRoot, Options{Key: k})
	ev, err := enc.RegisterVersion(ctx, "secret", pkg(t, "secret"), RegisterOptions{})
	require.NoError(t, err)
	body := getObject(t, c, "kiln", "enc/sha256/"+ev.Digest)
	assert.True(t, bytes.HasPrefix(body, []byte(encMagic)))
	assert.NotContains(t, string(body), "manifest.json")
	assert.Equal(t, ev.Size+int64(sealOverhead), int64(len(body)))
	_, err = s3Registry(t, dsn, encRoot, Options{Key: k}).Fetch(ctx, ev.Ref(), filepath.Join(t.TempDir(), "e"))
	require.NoError(t, err)
	_, err = s3Registry(t, dsn, encRoot, Options{}).Fetch(ctx, ev.Ref(), filepath.Join(t.TempDir(), "n"))
	require.ErrorIs(t, err, ErrNoKey)
	// A sealed object cut short is refused as corrupt.
	putObject(t, c, "kiln", "enc/sha256/"+ev.Digest, body[:20])
	_, err = enc.Fetch(ctx, ev.Ref(), filepath.Join(t.TempDir(), "cut"))
	require.ErrorIs(t, err, ErrDigestMismatch)
	assert.ErrorContains(t, err, "truncated or corrupt")
	putObject(t, c, "kiln", "enc/sha256/"+ev.Digest, body)
	// Registering the same package again keeps the sealed blob.
	_, err = enc.RegisterVersion(ctx, "secret", pkg(t, "secret"), RegisterOptions{})
	require.NoError(t, err)
	assert.Equal(t, body, getObject(t, c, "kiln", "enc/sha256/"+ev.Digest))

	// A failed upload registers nothing: with the S3 server gone, the
	// registration fails and the database has no row for it.
	before, err := one.Versions(ctx, "iris")
	require.NoError(t, err)
	srv.Stop()
	_, err = one.RegisterVersion(ctx, "fresh", pkg(t, "fresh"), RegisterOptions{})
	code(t, err, core.Unavailable)
	assert.ErrorContains(t, err, "unreachable")
	_, err = one.RegisterVersion(ctx, "iris", pkg(t, "other"), RegisterOptions{})
	code(t, err, core.Unavailable)
	_, err = two.Model(ctx, "fresh")
	code(t, err, core.NotFound)
	after, err := two.Versions(ctx, "iris")
	require.NoError(t, err)
	assert.Equal(t, len(before), len(after))
}

// TestS3ArtifactsOpenErrors: what cannot work fails Open with a clear
// error and a code.
func TestS3ArtifactsOpenErrors(t *testing.T) {
	srv := testkit.S3(t)
	srv.Setenv(t)
	srv.CreateBucket(t, "kiln")
	ctx := context.Background()
	dsn := testkit.PostgreSQL(t)

	_, err := Open(ctx, dsn, Options{ArtifactDir: "s3://Bad_Bucket/x"})
	code(t, err, core.InvalidArgument)
	_, err = Open(ctx, dsn, Options{ArtifactDir: "s3://absent/x"})
	code(t, err, core.FailedPrecondition)
	assert.ErrorContains(t, err, `bucket "absent" does not exist`)

	t.Run("wrong credentials", func(t *testing.T) {
		t.Setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
		_, err := Open(ctx, dsn, Options{ArtifactDir: "s3://kiln/x"})
		code(t, err, core.FailedPrecondition)
		assert.ErrorContains(t, err, "check AWS_ACCESS_KEY_ID")
	})
	t.Run("unreachable endpoint", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		t.Setenv("AWS_ENDPOINT_URL_S3", "http://"+l.Addr().String())
		l.Close()
		_, err = Open(ctx, dsn, Options{ArtifactDir: "s3://kiln/x"})
		code(t, err, core.Unavailable)
		assert.ErrorContains(t, err, "unreachable")
	})
	t.Run("path style", func(t *testing.T) {
		// KILN_S3_PATH_STYLE (Options.S3PathStyle) reaches the client; by
		// default a custom endpoint is addressed path-style.
		off := false
		r := s3Registry(t, dsn, "s3://kiln/x", Options{S3PathStyle: &off})
		assert.False(t, r.store.(*s3Store).client.Options().UsePathStyle)
		r = s3Registry(t, dsn, "s3://kiln/x", Options{})
		assert.True(t, r.store.(*s3Store).client.Options().UsePathStyle)
	})
}
