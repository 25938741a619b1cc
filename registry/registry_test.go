package registry

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/testkit"
)

func TestMain(m *testing.M) {
	if role := os.Getenv(childRole); role != "" {
		os.Exit(runChild(role))
	}
	testkit.Main(m)
}

// backend is where one run of the suite keeps its registry.
type backend struct {
	name string
	dsn  string
	dir  string // artifact root
}

// open opens the backend's registry with opts (ArtifactDir filled in).
func (b backend) open(t *testing.T, opts Options) *Registry {
	t.Helper()
	if opts.ArtifactDir == "" {
		opts.ArtifactDir = b.dir
	}
	r, err := Open(context.Background(), b.dsn, opts)
	require.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	return r
}

// eachBackend runs f against a fresh SQLite registry and a fresh
// PostgreSQL one: the same suite for both.
func eachBackend(t *testing.T, f func(t *testing.T, b backend)) {
	t.Run("sqlite", func(t *testing.T) {
		dir := t.TempDir()
		f(t, backend{name: "sqlite", dsn: filepath.Join(dir, "registry.db"), dir: filepath.Join(dir, "artifacts")})
	})
	t.Run("postgres", func(t *testing.T) {
		f(t, backend{name: "postgres", dsn: testkit.PostgreSQL(t), dir: filepath.Join(t.TempDir(), "artifacts")})
	})
}

// pkg returns a copy of the int8 test package whose manifest names the
// model name (so that different names give different artifacts).
func pkg(t *testing.T, name string) string {
	t.Helper()
	src := filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", "v1-int8")
	dst := filepath.Join(t.TempDir(), name)
	_, err := modelpkg.Copy(src, dst)
	require.NoError(t, err)
	man, err := modelpkg.Read(dst)
	require.NoError(t, err)
	man.Name = name
	require.NoError(t, modelpkg.WriteManifest(dst, man))
	return dst
}

func code(t *testing.T, err error, c core.Code) {
	t.Helper()
	require.Error(t, err)
	assert.Equal(t, c, core.CodeOf(err), "code of %v", err)
}

func TestModelsAndVersions(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.open(t, Options{})
		assert.Equal(t, Backend(b.name), r.Backend())
		p1, p2 := pkg(t, "a"), pkg(t, "b")

		run, err := r.StartRun(ctx, "train", "iris", "alice", map[string]string{"epochs": "3"})
		require.NoError(t, err)
		v1, err := r.RegisterVersion(ctx, "iris", p1, RegisterOptions{Actor: "alice", RunID: run.ID, Lineage: Lineage{DatasetVersion: "ds@4"}})
		require.NoError(t, err)
		assert.Equal(t, 1, v1.Version)
		assert.Equal(t, run.ID, v1.RunID)
		assert.Equal(t, "alice", v1.CreatedBy)
		assert.Equal(t, "ds@4", v1.Lineage.DatasetVersion)
		man, err := modelpkg.Read(p1)
		require.NoError(t, err)
		assert.Equal(t, man.Lineage.DataSHA256, v1.Lineage.DataSHA256)
		assert.Equal(t, "classification", v1.Lineage.Task)
		assert.Contains(t, string(v1.Lineage.Optimization), `"engine"`)
		assert.NotEmpty(t, v1.Lineage.Spec)

		// The digest is the archive's SHA-256, and the blob is there.
		archive, _, err := pack(p1)
		require.NoError(t, err)
		sum := sha256.Sum256(archive)
		assert.Equal(t, hex.EncodeToString(sum[:]), v1.Digest)
		assert.Equal(t, int64(len(archive)), v1.Size)
		assert.FileExists(t, filepath.Join(b.dir, "sha256", v1.Digest))

		v2, err := r.RegisterVersion(ctx, "iris", p2, RegisterOptions{Parent: &Ref{"iris", 1}, Description: "int8"})
		require.NoError(t, err)
		assert.Equal(t, 2, v2.Version)
		assert.Equal(t, &Ref{"iris", 1}, v2.Parent)
		assert.Equal(t, "unknown", v2.CreatedBy)
		vs, err := r.Versions(ctx, "iris")
		require.NoError(t, err)
		require.Len(t, vs, 2)
		assert.Equal(t, []int{2, 1}, []int{vs[0].Version, vs[1].Version})

		// The same package again is a new version over the same artifact.
		v3, err := r.RegisterVersion(ctx, "iris", p1, RegisterOptions{})
		require.NoError(t, err)
		assert.Equal(t, v1.Digest, v3.Digest)

		ms, err := r.Models(ctx)
		require.NoError(t, err)
		require.Len(t, ms, 1)
		assert.Equal(t, 3, ms[0].LatestVersion)
		_, err = r.CreateModel(ctx, "iris", "", "bob")
		code(t, err, core.AlreadyExists)
		m, err := r.CreateModel(ctx, "empty", "no versions yet", "bob")
		require.NoError(t, err)
		assert.Equal(t, "no versions yet", m.Description)

		// Fetch writes the package back, byte for byte.
		out := filepath.Join(t.TempDir(), "fetched")
		got, err := r.Fetch(ctx, Ref{"iris", 2}, out)
		require.NoError(t, err)
		assert.Equal(t, 2, got.Version)
		for _, f := range packFiles {
			want, _ := os.ReadFile(filepath.Join(p2, f))
			have, err := os.ReadFile(filepath.Join(out, f))
			require.NoError(t, err)
			assert.True(t, bytes.Equal(want, have), f)
		}
		_, err = r.Fetch(ctx, Ref{"iris", 2}, out)
		code(t, err, core.AlreadyExists)

		// Versions are immutable, in the database itself.
		_, err = r.db.ExecContext(ctx, r.q(`UPDATE model_versions SET digest = ? WHERE version = 1`), "0")
		assert.ErrorContains(t, err, "model versions are immutable")
		_, err = r.db.ExecContext(ctx, `DELETE FROM model_versions`)
		assert.ErrorContains(t, err, "model versions are immutable")

		// Bad input: clear errors with codes.
		_, err = r.Version(ctx, "iris", 9)
		code(t, err, core.NotFound)
		assert.ErrorContains(t, err, `model "iris" has no version 9`)
		_, err = r.Versions(ctx, "irs")
		code(t, err, core.NotFound)
		assert.ErrorContains(t, err, `model "irs" not found (models: empty, iris)`)
		_, err = r.RegisterVersion(ctx, "../x", p1, RegisterOptions{})
		code(t, err, core.InvalidArgument)
		_, err = r.RegisterVersion(ctx, "iris", p1, RegisterOptions{Parent: &Ref{"iris", 7}})
		code(t, err, core.NotFound)
		_, err = r.RegisterVersion(ctx, "iris", p1, RegisterOptions{RunID: "nope"})
		code(t, err, core.NotFound)
		_, err = r.RegisterVersion(ctx, "iris", t.TempDir(), RegisterOptions{})
		code(t, err, core.NotFound)
		// Failed registrations took no version numbers' place.
		v4, err := r.RegisterVersion(ctx, "iris", p2, RegisterOptions{})
		require.NoError(t, err)
		assert.Equal(t, 4, v4.Version)

		// URIs.
		v, err := r.Resolve(ctx, "models:/iris/latest")
		require.NoError(t, err)
		assert.Equal(t, 4, v.Version)
		v, err = r.Resolve(ctx, "models:/iris/2")
		require.NoError(t, err)
		assert.Equal(t, v2.Digest, v.Digest)
		for uri, c := range map[string]core.Code{
			"iris/2": core.InvalidArgument, "models:/iris": core.InvalidArgument, "models:/iris/0": core.InvalidArgument,
			"models:/iris@Prod": core.InvalidArgument, "models:/iris@production": core.NotFound, "models:/nope/1": core.NotFound,
			"models:/empty/latest": core.NotFound,
		} {
			_, err := r.Resolve(ctx, uri)
			code(t, err, c)
		}
	})
}

func TestRuns(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.open(t, Options{})
		run, err := r.StartRun(ctx, "train", "iris", "alice", map[string]string{"lr": "0.01", "epochs": "3"})
		require.NoError(t, err)
		assert.Len(t, run.ID, 32)
		assert.Equal(t, Running, run.Status)
		require.NoError(t, r.LogParams(ctx, run.ID, map[string]string{"batch_size": "16"}))
		code(t, r.LogParams(ctx, run.ID, map[string]string{"lr": "0.1"}), core.AlreadyExists)
		for epoch := 1; epoch <= 3; epoch++ {
			require.NoError(t, r.LogMetrics(ctx, run.ID, epoch, map[string]float64{"loss": 1 / float64(epoch), "accuracy": 0.5 + 0.1*float64(epoch)}))
		}
		require.NoError(t, r.LogMetrics(ctx, run.ID, 2, map[string]float64{"loss": 0.4})) // replaces epoch 2's loss
		code(t, r.LogMetrics(ctx, run.ID, 4, map[string]float64{"loss": nan()}), core.InvalidArgument)
		ms, err := r.RunMetrics(ctx, run.ID)
		require.NoError(t, err)
		require.Len(t, ms, 6)
		assert.Equal(t, Metric{Key: "loss", Step: 2, Value: 0.4}, Metric{Key: ms[4].Key, Step: ms[4].Step, Value: ms[4].Value})

		done, err := r.FinishRun(ctx, run.ID, Finished, map[string]float64{"accuracy": 0.8, "bad": nan()}, nil)
		require.NoError(t, err)
		assert.Equal(t, Finished, done.Status)
		assert.Equal(t, map[string]float64{"accuracy": 0.8}, done.Metrics)
		assert.Equal(t, map[string]string{"lr": "0.01", "epochs": "3", "batch_size": "16"}, done.Params)
		require.NotNil(t, done.EndedAt)
		assert.False(t, done.EndedAt.Before(done.StartedAt))
		assert.GreaterOrEqual(t, done.Seconds, 0.0)
		_, err = r.FinishRun(ctx, run.ID, Failed, nil, nil)
		code(t, err, core.FailedPrecondition)

		failed, err := r.StartRun(ctx, "optimize", "", "bob", nil)
		require.NoError(t, err)
		failed, err = r.FinishRun(ctx, failed.ID, Failed, nil, errors.New("kiln: out of memory"))
		require.NoError(t, err)
		assert.Equal(t, "kiln: out of memory", failed.Error)

		all, err := r.Runs(ctx, "", 0)
		require.NoError(t, err)
		assert.Len(t, all, 2)
		mine, err := r.Runs(ctx, "iris", 0)
		require.NoError(t, err)
		require.Len(t, mine, 1)
		assert.Equal(t, run.ID, mine[0].ID)
		one, err := r.Runs(ctx, "", 1)
		require.NoError(t, err)
		assert.Len(t, one, 1)

		_, err = r.Run(ctx, "nope")
		code(t, err, core.NotFound)
		code(t, r.LogMetrics(ctx, "nope", 1, map[string]float64{"loss": 1}), core.NotFound)
		_, err = r.StartRun(ctx, "", "", "", nil)
		code(t, err, core.InvalidArgument)
		_, err = r.FinishRun(ctx, run.ID, Running, nil, nil)
		code(t, err, core.InvalidArgument)
	})
}

func TestAliasesAndEvaluations(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.open(t, Options{})
		for _, n := range []string{"a", "b", "c"} {
			_, err := r.RegisterVersion(ctx, "iris", pkg(t, n), RegisterOptions{})
			require.NoError(t, err)
		}
		_, err := r.Alias(ctx, "iris", "production")
		code(t, err, core.NotFound)
		assert.ErrorContains(t, err, `model "iris" has no alias "production"`)

		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", To: 1, Actor: "alice", Reason: "first"})
		require.NoError(t, err)
		// Expecting no alias when there is one: lost.
		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", To: 2})
		require.ErrorIs(t, err, ErrConflict)
		code(t, err, core.FailedPrecondition)
		assert.ErrorContains(t, err, `alias "production" of model "iris" is at version 1; expected it not to exist`)

		ev, err := r.RecordEvaluation(ctx, Evaluation{Model: "iris", Version: 2, Verdict: "pass", Evidence: json.RawMessage(`{"accuracy": 0.97, "threshold": 0.9}`), CreatedBy: "gate"})
		require.NoError(t, err)
		assert.NotZero(t, ev.ID)
		moved, err := r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", Expected: 1, To: 2, Actor: "gate", Reason: "better", Verdict: "pass", EvaluationID: ev.ID})
		require.NoError(t, err)
		assert.Equal(t, 1, moved.From)
		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", Expected: 1, To: 3})
		require.ErrorIs(t, err, ErrConflict)
		assert.ErrorContains(t, err, "is at version 2; expected it at version 1")
		v, err := r.Alias(ctx, "iris", "production")
		require.NoError(t, err)
		assert.Equal(t, 2, v)
		got, err := r.Resolve(ctx, "models:/iris@production")
		require.NoError(t, err)
		assert.Equal(t, 2, got.Version)
		assert.Equal(t, []string{"production"}, got.Aliases)

		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "candidate", To: 3})
		require.NoError(t, err)
		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "candidate", Expected: 3}) // removes it
		require.NoError(t, err)
		_, err = r.Alias(ctx, "iris", "candidate")
		code(t, err, core.NotFound)

		hist, err := r.History(ctx, "iris", "production")
		require.NoError(t, err)
		require.Len(t, hist, 2)
		assert.Equal(t, AliasEvent{ID: hist[0].ID, Model: "iris", Alias: "production", From: 0, To: 1, Actor: "alice", Reason: "first", At: hist[0].At}, hist[0])
		assert.Equal(t, AliasEvent{ID: hist[1].ID, Model: "iris", Alias: "production", From: 1, To: 2, Actor: "gate", Reason: "better", Verdict: "pass", EvaluationID: ev.ID, At: hist[1].At}, hist[1])
		all, err := r.History(ctx, "iris", "")
		require.NoError(t, err)
		assert.Len(t, all, 4)
		evs, err := r.Evaluations(ctx, "iris", 2)
		require.NoError(t, err)
		require.Len(t, evs, 1)
		assert.JSONEq(t, `{"accuracy": 0.97, "threshold": 0.9}`, string(evs[0].Evidence))
		assert.Equal(t, "gate", evs[0].CreatedBy)

		// Bad input.
		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "production", Expected: 2, To: 9})
		code(t, err, core.NotFound)
		_, err = r.CompareAndSwap(ctx, Move{Model: "nope", Alias: "production", To: 1})
		code(t, err, core.NotFound)
		for _, bad := range []string{"Production", "1", "latest", "", "a b"} {
			_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: bad, To: 1})
			code(t, err, core.InvalidArgument)
		}
		_, err = r.CompareAndSwap(ctx, Move{Model: "iris", Alias: "x"})
		code(t, err, core.InvalidArgument)
		_, err = r.RecordEvaluation(ctx, Evaluation{Model: "iris", Version: 1, Verdict: "pass", Evidence: json.RawMessage(`{`)})
		code(t, err, core.InvalidArgument)
		_, err = r.RecordEvaluation(ctx, Evaluation{Model: "iris", Version: 8, Verdict: "pass"})
		code(t, err, core.NotFound)
		_, err = r.History(ctx, "nope", "")
		code(t, err, core.NotFound)
	})
}

func TestArtifacts(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.open(t, Options{})
		v, err := r.RegisterVersion(ctx, "iris", pkg(t, "a"), RegisterOptions{})
		require.NoError(t, err)

		// Tampered: refused, naming the expected and the actual digest.
		blob := filepath.Join(b.dir, "sha256", v.Digest)
		body, err := os.ReadFile(blob)
		require.NoError(t, err)
		require.NoError(t, os.Chmod(blob, 0o644))
		tampered := bytes.Replace(body, []byte(`"tiny"`), []byte(`"tinY"`), 1)
		if bytes.Equal(tampered, body) {
			tampered[len(tampered)-1] ^= 1
		}
		require.NoError(t, os.WriteFile(blob, tampered, 0o644))
		sum := sha256.Sum256(tampered)
		_, err = r.Fetch(ctx, Ref{"iris", 1}, filepath.Join(t.TempDir(), "x"))
		require.ErrorIs(t, err, ErrDigestMismatch)
		assert.ErrorContains(t, err, "artifact sha256:"+v.Digest+" has content with sha256:"+hex.EncodeToString(sum[:]))
		code(t, err, core.Internal)
		require.NoError(t, os.Remove(blob))
		_, err = r.Fetch(ctx, Ref{"iris", 1}, filepath.Join(t.TempDir(), "x"))
		code(t, err, core.NotFound)
		_, err = r.ReadArtifact(ctx, "../../etc/passwd")
		code(t, err, core.InvalidArgument)

		// Encrypted: the blob holds no plaintext; it round-trips.
		key, err := ParseKey([]byte(strings.Repeat("ab", 32)))
		require.NoError(t, err)
		enc := b.open(t, Options{Key: key, ArtifactDir: filepath.Join(t.TempDir(), "enc")})
		p := pkg(t, "secret")
		ev, err := enc.RegisterVersion(ctx, "iris", p, RegisterOptions{})
		require.NoError(t, err)
		body, err = os.ReadFile(filepath.Join(enc.ArtifactDir(), "sha256", ev.Digest))
		require.NoError(t, err)
		assert.True(t, bytes.HasPrefix(body, []byte(encMagic)))
		assert.NotContains(t, string(body), "manifest.json")
		assert.NotContains(t, string(body), `"secret"`)
		out := filepath.Join(t.TempDir(), "out")
		_, err = enc.Fetch(ctx, ev.Ref(), out)
		require.NoError(t, err)
		want, _ := os.ReadFile(filepath.Join(p, modelpkg.ModelFile))
		have, _ := os.ReadFile(filepath.Join(out, modelpkg.ModelFile))
		assert.True(t, bytes.Equal(want, have))

		// No key, another key: clear errors.
		plain := b.open(t, Options{ArtifactDir: enc.ArtifactDir()})
		_, err = plain.Fetch(ctx, ev.Ref(), filepath.Join(t.TempDir(), "y"))
		require.ErrorIs(t, err, ErrNoKey)
		assert.ErrorContains(t, err, "encrypted with key "+key.ID()+"): set KILN_REGISTRY_KEY or KILN_REGISTRY_KEY_FILE")
		code(t, err, core.FailedPrecondition)
		other, err := ParseKey(bytes.Repeat([]byte{7}, 32))
		require.NoError(t, err)
		wrong := b.open(t, Options{Key: other, ArtifactDir: enc.ArtifactDir()})
		_, err = wrong.Fetch(ctx, ev.Ref(), filepath.Join(t.TempDir(), "z"))
		require.ErrorIs(t, err, ErrWrongKey)
		assert.ErrorContains(t, err, "encrypted with key "+key.ID()+", the registry's key is "+other.ID())

		// A changed ciphertext fails authentication.
		eblob := filepath.Join(enc.ArtifactDir(), "sha256", ev.Digest)
		require.NoError(t, os.Chmod(eblob, 0o644))
		body[len(body)-20] ^= 0x40
		require.NoError(t, os.WriteFile(eblob, body, 0o644))
		_, err = enc.Fetch(ctx, ev.Ref(), filepath.Join(t.TempDir(), "w"))
		require.ErrorIs(t, err, ErrDigestMismatch)
		assert.ErrorContains(t, err, "fails authentication")
	})
}

func TestKey(t *testing.T) {
	raw := bytes.Repeat([]byte{0xA5}, 32)
	k1, err := ParseKey(raw)
	require.NoError(t, err)
	k2, err := ParseKey([]byte(hex.EncodeToString(raw) + "\n"))
	require.NoError(t, err)
	k3, err := ParseKey([]byte("paWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaU="))
	require.NoError(t, err)
	assert.Equal(t, k1.ID(), k2.ID())
	assert.Equal(t, k1.ID(), k3.ID())
	// The key's bytes print nowhere.
	for _, s := range []string{k1.String(), k1.GoString(), k1.LogValue().String()} {
		assert.NotContains(t, s, "a5a5")
		assert.NotContains(t, s, "paWl")
	}
	_, err = ParseKey([]byte("short"))
	code(t, err, core.InvalidArgument)
	assert.NotContains(t, err.Error(), "short")

	file := filepath.Join(t.TempDir(), "key")
	require.NoError(t, os.WriteFile(file, raw, 0o600))
	k, err := LoadKey("", file)
	require.NoError(t, err)
	assert.Equal(t, k1.ID(), k.ID())
	k, err = LoadKey("", "")
	require.NoError(t, err)
	assert.Nil(t, k)
	_, err = LoadKey(hex.EncodeToString(raw), file)
	code(t, err, core.InvalidArgument)
	_, err = LoadKey("", filepath.Join(t.TempDir(), "missing"))
	code(t, err, core.NotFound)
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	_, err := Open(ctx, "", Options{})
	code(t, err, core.InvalidArgument)
	_, err = Open(ctx, "mysql://x", Options{})
	code(t, err, core.InvalidArgument)
	_, err = Open(ctx, "postgres://kiln@/db?host=/nonexistent", Options{})
	code(t, err, core.InvalidArgument) // no artifact directory
	_, err = Open(ctx, "postgres://kiln:secret@/db?host=/nonexistent", Options{ArtifactDir: t.TempDir()})
	code(t, err, core.Unavailable)
	assert.NotContains(t, err.Error(), "secret")
	// sqlite:// and a plain path open the same file.
	dir := t.TempDir()
	r, err := Open(ctx, "sqlite://"+filepath.Join(dir, "r.db"), Options{})
	require.NoError(t, err)
	_, err = r.CreateModel(ctx, "m", "", "")
	require.NoError(t, err)
	r.Close()
	r, err = Open(ctx, filepath.Join(dir, "r.db"), Options{})
	require.NoError(t, err)
	defer r.Close()
	_, err = r.Model(ctx, "m")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "artifacts"), r.ArtifactDir())
}

func TestUnpackRefuses(t *testing.T) {
	build := func(names ...string) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, n := range names {
			tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
			tw.Write([]byte("x"))
		}
		tw.Close()
		return buf.Bytes()
	}
	_, err := unpack(build(modelpkg.ManifestFile, modelpkg.ModelFile))
	require.NoError(t, err)
	for _, names := range [][]string{
		{modelpkg.ManifestFile}, {modelpkg.ManifestFile, modelpkg.ModelFile, "../evil"},
		{modelpkg.ManifestFile, modelpkg.ManifestFile, modelpkg.ModelFile},
	} {
		_, err := unpack(build(names...))
		code(t, err, core.InvalidArgument)
	}
}

func nan() float64 { return math.NaN() }
