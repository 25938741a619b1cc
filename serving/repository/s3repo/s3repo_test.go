package s3repo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/internal/testkit"
)

func quiet() *slog.Logger {
	if testing.Verbose() {
		return slog.Default()
	}
	return slog.New(slog.DiscardHandler)
}

// writeModel makes a model directory with a config and the given versions,
// each a model.pt with the version's text.
func writeModel(t *testing.T, versions ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "m")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.yaml"), []byte("max_batch_size: 4\n"), 0o644))
	for i, body := range versions {
		vd := filepath.Join(dir, strings.TrimSpace(string(rune('1'+i))))
		require.NoError(t, os.MkdirAll(filepath.Join(vd, "sub"), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(vd, "model.pt"), []byte(body), 0o644))
		require.NoError(t, os.WriteFile(filepath.Join(vd, "sub", "extra.bin"), []byte("extra "+body), 0o644))
	}
	return dir
}

func put(t *testing.T, c *s3.Client, bucket, key, body string) {
	t.Helper()
	_, err := c.PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: strings.NewReader(body)})
	require.NoError(t, err)
}

func manifestOf(files map[string]string) string {
	m := Manifest{Format: ManifestFormat}
	for p, body := range files {
		sum := sha256.Sum256([]byte(body))
		m.Files = append(m.Files, ManifestFile{Path: p, Size: int64(len(body)), SHA256: hex.EncodeToString(sum[:])})
	}
	b, _ := json.Marshal(m)
	return string(b)
}

func newTestMirror(t *testing.T, c *s3.Client, loc Location) *Mirror {
	t.Helper()
	m, err := NewMirror(c, loc, t.TempDir(), MirrorOptions{Logger: quiet()})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return string(b)
}

func TestMirrorPushAndSync(t *testing.T) {
	srv := testkit.S3(t)
	srv.CreateBucket(t, "models")
	c := srv.Client()
	ctx := context.Background()
	loc := Location{Bucket: "models", Prefix: "team/repo"}

	res, err := Push(ctx, c, writeModel(t, "v1 bytes"), loc.Child("mlp"), PushOptions{})
	require.NoError(t, err)
	assert.Equal(t, []int64{1}, res.Versions)
	assert.Equal(t, 4, res.Objects) // model.pt, sub/extra.bin, marker, config.yaml

	m := newTestMirror(t, c, loc)
	require.NoError(t, m.Sync(ctx))
	repo := m.Dir()
	assert.Equal(t, "max_batch_size: 4\n", readFile(t, filepath.Join(repo, "mlp", "config.yaml")))
	assert.Equal(t, "v1 bytes", readFile(t, filepath.Join(repo, "mlp", "1", "model.pt")))
	assert.Equal(t, "extra v1 bytes", readFile(t, filepath.Join(repo, "mlp", "1", "sub", "extra.bin")))
	wide, versions := m.Problem("mlp")
	assert.Empty(t, wide)
	assert.Empty(t, versions)

	// Nothing changed: nothing is downloaded again (the same inode stays).
	st1, err := os.Stat(filepath.Join(repo, "mlp", "1", "model.pt"))
	require.NoError(t, err)
	require.NoError(t, m.Sync(ctx))
	st2, err := os.Stat(filepath.Join(repo, "mlp", "1", "model.pt"))
	require.NoError(t, err)
	assert.True(t, os.SameFile(st1, st2), "an unchanged version was downloaded again")

	// A half-uploaded version (no marker) stays invisible, with a reason.
	put(t, c, "models", "team/repo/mlp/2/model.pt", "v2 bytes")
	require.NoError(t, m.Sync(ctx))
	assert.NoDirExists(t, filepath.Join(repo, "mlp", "2"))
	_, versions = m.Problem("mlp")
	assert.Contains(t, versions[2], "incomplete")
	assert.Contains(t, versions[2], MarkerName)

	// A corrupt object (its digest differs from the manifest's): not in
	// place, the reason names the object.
	put(t, c, "models", "team/repo/mlp/2/"+MarkerName, manifestOf(map[string]string{"model.pt": "v2 BYTES"}))
	require.NoError(t, m.Sync(ctx))
	assert.NoDirExists(t, filepath.Join(repo, "mlp", "2"))
	_, versions = m.Problem("mlp")
	assert.Contains(t, versions[2], "corrupt object")
	assert.Contains(t, versions[2], "team/repo/mlp/2/model.pt")
	assert.Equal(t, "v1 bytes", readFile(t, filepath.Join(repo, "mlp", "1", "model.pt")))

	// A manifest naming a file the bucket lacks.
	put(t, c, "models", "team/repo/mlp/2/"+MarkerName, manifestOf(map[string]string{"model.pt": "v2 bytes", "weights.bin": "w"}))
	require.NoError(t, m.Sync(ctx))
	_, versions = m.Problem("mlp")
	assert.Contains(t, versions[2], "weights.bin is listed")

	// A malformed manifest.
	put(t, c, "models", "team/repo/mlp/2/"+MarkerName, `{"format": "kiln.version/v1", "files": [{"path": "../x", "size": 1, "sha256": "00"}]}`)
	require.NoError(t, m.Sync(ctx))
	_, versions = m.Problem("mlp")
	assert.Contains(t, versions[2], "manifest")

	// Pushed properly, it appears whole; the problem goes.
	res, err = PushVersion(ctx, c, filepath.Join(writeModel(t, "x", "v2 fixed"), "2"), loc.Child("mlp/2"), PushOptions{})
	require.NoError(t, err)
	require.NoError(t, m.Sync(ctx))
	assert.Equal(t, "v2 fixed", readFile(t, filepath.Join(repo, "mlp", "2", "model.pt")))
	_, versions = m.Problem("mlp")
	assert.Empty(t, versions)

	// Re-pushed with other bytes: replaced whole.
	_, err = PushVersion(ctx, c, filepath.Join(writeModel(t, "x", "v2 again"), "2"), loc.Child("mlp/2"), PushOptions{})
	require.NoError(t, err)
	require.NoError(t, m.Sync(ctx))
	assert.Equal(t, "v2 again", readFile(t, filepath.Join(repo, "mlp", "2", "model.pt")))
	assert.Equal(t, "extra v2 again", readFile(t, filepath.Join(repo, "mlp", "2", "sub", "extra.bin")))

	// A version whose marker is deleted goes; a model gone from the
	// bucket goes; a directory the mirror did not make stays.
	require.NoError(t, os.MkdirAll(filepath.Join(repo, "local", "1"), 0o755))
	_, err = c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String("models"), Key: aws.String("team/repo/mlp/1/" + MarkerName)})
	require.NoError(t, err)
	require.NoError(t, m.Sync(ctx))
	assert.NoDirExists(t, filepath.Join(repo, "mlp", "1"))
	assert.DirExists(t, filepath.Join(repo, "mlp", "2"))
	for _, k := range []string{"config.yaml", "1/model.pt", "1/sub/extra.bin", "2/model.pt", "2/sub/extra.bin", "2/" + MarkerName} {
		_, err = c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String("models"), Key: aws.String("team/repo/mlp/" + k)})
		require.NoError(t, err)
	}
	require.NoError(t, m.Sync(ctx))
	assert.NoDirExists(t, filepath.Join(repo, "mlp"))
	assert.DirExists(t, filepath.Join(repo, "local", "1"))
	blobs, err := os.ReadDir(filepath.Join(m.dir, "blobs"))
	require.NoError(t, err)
	assert.Empty(t, blobs, "blobs of removed versions are collected")
}

func TestMirrorStateSurvivesRestart(t *testing.T) {
	srv := testkit.S3(t)
	srv.CreateBucket(t, "models")
	c := srv.Client()
	ctx := context.Background()
	loc := Location{Bucket: "models"}
	_, err := Push(ctx, c, writeModel(t, "one"), loc.Child("mlp"), PushOptions{})
	require.NoError(t, err)
	dir := t.TempDir()
	m, err := NewMirror(c, loc, dir, MirrorOptions{Logger: quiet()})
	require.NoError(t, err)
	_, err = NewMirror(c, loc, dir, MirrorOptions{Logger: quiet()})
	require.ErrorContains(t, err, "in use by another process")
	require.NoError(t, m.Sync(ctx))
	st1, err := os.Stat(filepath.Join(m.Dir(), "mlp", "1", "model.pt"))
	require.NoError(t, err)
	require.NoError(t, m.Close())

	m2, err := NewMirror(c, loc, dir, MirrorOptions{Logger: quiet()})
	require.NoError(t, err)
	defer m2.Close()
	require.NoError(t, m2.Sync(ctx))
	st2, err := os.Stat(filepath.Join(m2.Dir(), "mlp", "1", "model.pt"))
	require.NoError(t, err)
	assert.True(t, os.SameFile(st1, st2), "the cache was not reused across a restart")
}

func TestMirrorBadEndpoints(t *testing.T) {
	srv := testkit.S3(t)
	srv.CreateBucket(t, "models")
	c := srv.Client()
	ctx := context.Background()
	_, err := Push(ctx, c, writeModel(t, "one"), Location{Bucket: "models"}.Child("mlp"), PushOptions{})
	require.NoError(t, err)

	t.Run("wrong credentials", func(t *testing.T) {
		bad := s3.New(s3.Options{BaseEndpoint: aws.String(srv.Endpoint), Region: srv.Region, UsePathStyle: true,
			Credentials: credentials.NewStaticCredentialsProvider(srv.AccessKey, "wrong-secret", "")})
		m := newTestMirror(t, bad, Location{Bucket: "models"})
		err := m.Sync(ctx)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "refused")
		assert.Contains(t, err.Error(), "AWS_SECRET_ACCESS_KEY")
		wide, _ := m.Problem("mlp")
		assert.Contains(t, wide, "refused")
	})
	t.Run("missing bucket", func(t *testing.T) {
		m := newTestMirror(t, c, Location{Bucket: "no-such-bucket"})
		err := m.Sync(ctx)
		require.Error(t, err)
		assert.Contains(t, err.Error(), `bucket "no-such-bucket" does not exist`)
	})
	t.Run("unreachable endpoint, last good state kept", func(t *testing.T) {
		m := newTestMirror(t, c, Location{Bucket: "models"})
		require.NoError(t, m.Sync(ctx))
		srv.Stop()
		sctx, cancel := context.WithTimeout(ctx, 20e9)
		defer cancel()
		err := m.Sync(sctx)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "unreachable")
		assert.Equal(t, "one", readFile(t, filepath.Join(m.Dir(), "mlp", "1", "model.pt")))
		wide, _ := m.Problem("mlp")
		assert.Contains(t, wide, "unreachable")
	})
}

func TestParseManifest(t *testing.T) {
	good := manifestOf(map[string]string{"model.pt": "x", "sub/a.bin": "y"})
	m, err := ParseManifest([]byte(good))
	require.NoError(t, err)
	assert.Len(t, m.Files, 2)
	sum := strings.Repeat("ab", 32)
	for name, raw := range map[string]string{
		"format":    `{"format": "other", "files": [{"path": "a", "size": 1, "sha256": "` + sum + `"}]}`,
		"no files":  `{"format": "kiln.version/v1", "files": []}`,
		"dotdot":    `{"format": "kiln.version/v1", "files": [{"path": "../a", "size": 1, "sha256": "` + sum + `"}]}`,
		"absolute":  `{"format": "kiln.version/v1", "files": [{"path": "/a", "size": 1, "sha256": "` + sum + `"}]}`,
		"hidden":    `{"format": "kiln.version/v1", "files": [{"path": ".kiln-complete", "size": 1, "sha256": "` + sum + `"}]}`,
		"twice":     `{"format": "kiln.version/v1", "files": [{"path": "a", "size": 1, "sha256": "` + sum + `"}, {"path": "a", "size": 1, "sha256": "` + sum + `"}]}`,
		"negative":  `{"format": "kiln.version/v1", "files": [{"path": "a", "size": -1, "sha256": "` + sum + `"}]}`,
		"bad sha":   `{"format": "kiln.version/v1", "files": [{"path": "a", "size": 1, "sha256": "zz"}]}`,
		"upper sha": `{"format": "kiln.version/v1", "files": [{"path": "a", "size": 1, "sha256": "` + strings.ToUpper(sum) + `"}]}`,
		"unknown":   `{"format": "kiln.version/v1", "extra": 1, "files": [{"path": "a", "size": 1, "sha256": "` + sum + `"}]}`,
		"trailing":  good + `{}`,
		"too big":   string(bytes.Repeat([]byte(" "), MaxManifestBytes+1)),
	} {
		_, err := ParseManifest([]byte(raw))
		assert.Error(t, err, name)
	}
}

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(manifestOf(map[string]string{"model.pt": "x"})))
	f.Add([]byte(`{"format": "kiln.version/v1", "files": [{"path": "a/b", "size": 0, "sha256": "` + strings.Repeat("0", 64) + `"}]}`))
	f.Add([]byte(`{"files": null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b)
		if err != nil {
			return
		}
		if len(m.Files) == 0 || len(m.Files) > MaxManifestFiles {
			t.Fatalf("accepted %d files", len(m.Files))
		}
		for _, f := range m.Files {
			if validRelPath(f.Path) != nil || f.Size < 0 || len(f.SHA256) != 64 {
				t.Fatalf("accepted %+v", f)
			}
			if strings.Contains(filepath.Clean(filepath.Join("/root", f.Path)), "..") || !strings.HasPrefix(filepath.Join("/root", f.Path), "/root/") {
				t.Fatalf("path %q escapes the version directory", f.Path)
			}
		}
	})
}

func TestFetch(t *testing.T) {
	srv := testkit.S3(t)
	srv.CreateBucket(t, "models")
	c := srv.Client()
	ctx := context.Background()
	loc := Location{Bucket: "models", Prefix: "repo/mlp"}
	_, err := Push(ctx, c, writeModel(t, "one", "two"), loc, PushOptions{})
	require.NoError(t, err)
	dst := t.TempDir()
	res, err := Fetch(ctx, c, loc, dst, nil)
	require.NoError(t, err)
	assert.Equal(t, 4, res.Verified, "model.pt and sub/extra.bin of both versions")
	assert.Equal(t, "extra two", readFile(t, filepath.Join(dst, "2", "sub", "extra.bin")))

	// A nested file whose bytes changed after the marker was written.
	put(t, c, "models", "repo/mlp/2/sub/extra.bin", "extra TWO")
	bad := t.TempDir()
	_, err = Fetch(ctx, c, loc, bad, nil)
	require.ErrorIs(t, err, ErrIntegrity)
	assert.Contains(t, err.Error(), "repo/mlp/2/sub/extra.bin")
	ents, err := os.ReadDir(bad)
	require.NoError(t, err)
	assert.Empty(t, ents)

	_, err = Fetch(ctx, c, Location{Bucket: "models", Prefix: "nothing"}, t.TempDir(), nil)
	require.ErrorIs(t, err, ErrNotFound)
}
