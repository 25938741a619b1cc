package follower

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

func TestMain(m *testing.M) { testkit.Main(m) }

// pkg copies a test package (v1-float or v1-int8), named name so that
// copies with different names are different artifacts.
func pkg(t *testing.T, src, name string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), name)
	_, err := modelpkg.Copy(filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", src), dst)
	require.NoError(t, err)
	man, err := modelpkg.Read(dst)
	require.NoError(t, err)
	man.Name = name
	require.NoError(t, modelpkg.WriteManifest(dst, man))
	return dst
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type fixture struct {
	reg   *registry.Registry
	repo  string
	mgr   *manager.Manager
	f     *Follower
	clock *clock
}

func newFixture(t *testing.T, reg *registry.Registry, repo string) *fixture {
	t.Helper()
	r, err := repository.Open(repo)
	require.NoError(t, err)
	mgr := manager.New(r, manager.Options{})
	t.Cleanup(mgr.Close)
	c := &clock{t: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	f, err := New(Options{Registry: reg, Manager: mgr, Repository: repo, Grace: time.Minute, Now: c.now})
	require.NoError(t, err)
	return &fixture{reg: reg, repo: repo, mgr: mgr, f: f, clock: c}
}

func (x *fixture) move(t *testing.T, from, to int) {
	t.Helper()
	_, err := x.reg.CompareAndSwap(context.Background(), registry.Move{Model: "m", Alias: "production", Expected: from, To: to, Actor: "test"})
	require.NoError(t, err)
}

// serving returns the version that answers m's unversioned requests.
func (x *fixture) serving(t *testing.T) int64 {
	t.Helper()
	v, err := x.mgr.Acquire("m", "")
	require.NoError(t, err)
	defer v.Release()
	return v.Number()
}

func infer(mgr *manager.Manager) error {
	v, err := mgr.Acquire("m", "")
	if err != nil {
		return err
	}
	defer v.Release()
	// The packages were trained on a table with a category column, so
	// they serve raw records: one float32 [batch, 1] input per column (a,
	// b, and colour's code, as the decoders hand them to the manager).
	col := func() batcher.Tensor {
		return batcher.Tensor{DType: core.Float32, Shape: []int64{1, 1}, Data: make([]byte, 4)}
	}
	_, err = v.Infer(context.Background(), []batcher.Tensor{col(), col(), col()})
	return err
}

// TestFollowAlias: the server serves the alias's version, follows each
// move after loading the new version, rolls back at once to the version
// kept for the grace period, unloads it after the grace period, refuses a
// tampered artifact naming its digest (the old version keeps serving),
// and requests running throughout never fail.
func TestFollowAlias(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	reg, err := registry.Open(ctx, filepath.Join(dir, "registry.db"), registry.Options{})
	require.NoError(t, err)
	defer reg.Close()
	for _, p := range []string{pkg(t, "v1-float", "a"), pkg(t, "v1-int8", "b"), pkg(t, "v1-float", "c")} {
		_, err := reg.RegisterVersion(ctx, "m", p, registry.RegisterOptions{Actor: "test"})
		require.NoError(t, err)
	}
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "repo"), 0o755))
	x := newFixture(t, reg, filepath.Join(dir, "repo"))
	require.NoError(t, x.f.Sync(ctx), "no alias yet: nothing to do")
	assert.Empty(t, x.mgr.Versions("m"))

	x.move(t, 0, 1)
	require.NoError(t, x.f.Sync(ctx))
	assert.Equal(t, int64(1), x.serving(t))
	assert.FileExists(t, filepath.Join(x.repo, "m", "1", MarkerFile))

	// Clients run throughout the moves below.
	stop := make(chan struct{})
	var failures, calls atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				calls.Add(1)
				if err := infer(x.mgr); err != nil {
					failures.Add(1)
					t.Log(err)
				}
			}
		}()
	}

	v1, err := x.mgr.Acquire("m", "1")
	require.NoError(t, err)
	v1.Release()
	x.move(t, 1, 2)
	require.NoError(t, x.f.Sync(ctx))
	assert.Equal(t, int64(2), x.serving(t))
	assert.Equal(t, []int64{1, 2}, x.mgr.Versions("m"), "the previous version stays loaded for the grace period")

	x.move(t, 2, 1) // roll back within the grace period: nothing loads
	require.NoError(t, x.f.Sync(ctx))
	back, err := x.mgr.Acquire("m", "")
	require.NoError(t, err)
	assert.Same(t, v1, back, "the kept instance answers at once")
	back.Release()
	st := x.f.Status()
	require.Len(t, st, 1)
	assert.Equal(t, 1, st[0].Serving)
	assert.Equal(t, 2, st[0].Previous)
	require.Len(t, st[0].Events, 3)
	assert.True(t, st[0].Events[2].Rollback)

	x.clock.add(time.Minute + time.Second)
	require.NoError(t, x.f.Sync(ctx))
	assert.Equal(t, []int64{1}, x.mgr.Versions("m"), "the previous version goes after the grace period")

	// Version 3's artifact is tampered with: refused, naming the digest;
	// version 1 keeps serving.
	v3, err := reg.Version(ctx, "m", 3)
	require.NoError(t, err)
	blob := filepath.Join(reg.ArtifactDir(), "sha256", v3.Digest)
	require.NoError(t, os.Chmod(blob, 0o644))
	raw, err := os.ReadFile(blob)
	require.NoError(t, err)
	raw[len(raw)/2] ^= 0xff
	require.NoError(t, os.WriteFile(blob, raw, 0o644))
	x.move(t, 1, 3)
	err = x.f.Sync(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), v3.Digest)
	assert.Equal(t, int64(1), x.serving(t))
	assert.Contains(t, x.f.Status()[0].Error, v3.Digest)
	_, statErr := os.Stat(filepath.Join(x.repo, "m", "3"))
	assert.True(t, os.IsNotExist(statErr), "nothing of the refused version is installed")
	// It is not fetched again before RetryAfter.
	err = x.f.Sync(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "retried after")

	close(stop)
	wg.Wait()
	assert.Zero(t, failures.Load(), "requests failed during the moves (of %d)", calls.Load())
	assert.Positive(t, calls.Load())

	// A restarted server (new manager and follower, same repository)
	// reuses the installed copy after checking it, and refuses a copy
	// that was changed.
	x.move(t, 3, 2)
	y := newFixture(t, reg, x.repo)
	require.NoError(t, y.f.Sync(ctx))
	assert.Equal(t, int64(2), y.serving(t))
	z := newFixture(t, reg, x.repo)
	require.NoError(t, os.WriteFile(filepath.Join(x.repo, "m", "2", "model.pt"), []byte("changed"), 0o644))
	err = z.f.Sync(ctx)
	require.Error(t, err)
	assert.Equal(t, core.FailedPrecondition, core.CodeOf(err), "%v", err)
	assert.Contains(t, err.Error(), "was changed")
}

func TestNewChecksOptions(t *testing.T) {
	_, err := New(Options{})
	assert.Equal(t, core.InvalidArgument, core.CodeOf(err))
}
