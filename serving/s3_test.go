package serving

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository/s3repo"
)

// startS3 pushes the serving-repo fixture's model affine (versions 1 and
// 2, policy all) to a real S3 server at s3://models/repo and serves it
// from there, polling every 200 ms.
func startS3(t *testing.T) (*testkit.S3Server, *Server, pb.GRPCInferenceServiceClient) {
	t.Helper()
	s3srv := testkit.S3(t)
	s3srv.Setenv(t)
	s3srv.CreateBucket(t, "models")
	fx := testkit.Fixture(t, "serving-repo")
	_, err := s3repo.Push(context.Background(), s3srv.Client(), filepath.Join(fx, "affine"),
		s3repo.Location{Bucket: "models", Prefix: "repo/affine"}, s3repo.PushOptions{})
	require.NoError(t, err)
	cfg := testConfig("s3://models/repo", Config{ModelControl: ControlPoll, PollInterval: 200 * time.Millisecond})
	cfg.RepositoryCache = t.TempDir()
	srv := serve(t, cfg)
	conn := dial(t, srv)
	return s3srv, srv, pb.NewGRPCInferenceServiceClient(conn)
}

// indexRow returns the repository index's row of affine's version v.
func indexRow(t *testing.T, srv *Server, v string) (manager.IndexEntry, bool) {
	rows, err := srv.Manager().Index(false)
	require.NoError(t, err)
	for _, r := range rows {
		if r.Name == "affine" && r.Version == v {
			return r, true
		}
	}
	return manager.IndexEntry{}, false
}

// TestServeFromS3: versions uploaded to S3 appear within a few poll
// intervals and switch atomically under load (zero failed requests); a
// half-uploaded or corrupt version, and then an unreachable endpoint, are
// reported in the index while the last good version keeps serving.
func TestServeFromS3(t *testing.T) {
	s3srv, srv, c := startS3(t)
	ctx := context.Background()
	for _, v := range []string{"1", "2"} {
		_, err := c.ModelInfer(ctx, affineReq(v, 1, 1, 2, 3, 4))
		require.NoError(t, err, "version %s", v)
	}

	// Clients under load: requests naming no version get the highest.
	var failed, done atomic.Int64
	var seen sync.Map
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.ModelInfer(ctx, affineReq("", 1, 1, 2, 3, 4))
				done.Add(1)
				if err != nil {
					failed.Add(1)
					t.Log(err)
					continue
				}
				seen.Store(resp.ModelVersion, true)
			}
		})
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				close(stop)
				wg.Wait()
				rows, _ := srv.Manager().Index(false)
				t.Fatalf("%s: not within 20 s; index %+v", what, rows)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	fx := testkit.Fixture(t, "serving-repo")
	client := s3srv.Client()
	// Version 3 (version 1's bytes), uploaded with its marker last.
	_, err := s3repo.PushVersion(ctx, client, filepath.Join(fx, "affine", "1"), s3repo.Location{Bucket: "models", Prefix: "repo/affine/3"}, s3repo.PushOptions{})
	require.NoError(t, err)
	waitFor("version 3 serves", func() bool { _, ok := seen.Load("3"); return ok })

	// A half-uploaded version 4: invisible, reported.
	s3srv.PutObject(t, "models", "repo/affine/4/model.pt", "partial")
	waitFor("version 4 reported incomplete", func() bool {
		r, ok := indexRow(t, srv, "4")
		return ok && r.State == manager.StateUnavailable && strings.Contains(r.Reason, "incomplete")
	})
	// Then its marker, with a digest the object does not have.
	marker := fmt.Sprintf(`{"format": %q, "files": [{"path": "model.pt", "size": 7, "sha256": %q}]}`, s3repo.ManifestFormat, strings.Repeat("0", 64))
	s3srv.PutObject(t, "models", "repo/affine/4/"+s3repo.MarkerName, marker)
	waitFor("version 4 reported corrupt", func() bool {
		r, ok := indexRow(t, srv, "4")
		return ok && strings.Contains(r.Reason, "corrupt object")
	})
	// The endpoint goes away: the index says so, version 3 keeps serving.
	s3srv.Stop()
	waitFor("the unreachable endpoint reported", func() bool {
		r, ok := indexRow(t, srv, "3")
		return ok && r.State == manager.StateReady && strings.Contains(r.Reason, "unreachable")
	})
	n := done.Load()
	waitFor("more requests served", func() bool { return done.Load() > n+20 })
	close(stop)
	wg.Wait()
	assert.Zero(t, failed.Load(), "failed requests out of %d", done.Load())
	resp, err := c.ModelInfer(ctx, affineReq("", 1, 1, 2, 3, 4))
	require.NoError(t, err)
	assert.Equal(t, "3", resp.ModelVersion)
	assert.Equal(t, []float32{3, 5, 7, 9}, f32s(resp.RawOutputContents[0]))
	t.Logf("%d requests during the switches, none failed", done.Load())
}

// TestServeFromS3StartErrors: a server whose S3 repository cannot be
// listed does not start, and says why.
func TestServeFromS3StartErrors(t *testing.T) {
	s3srv := testkit.S3(t)
	s3srv.Setenv(t)
	s3srv.CreateBucket(t, "models")
	startErr := func(uri string) error {
		cfg := testConfig(uri, Config{})
		srv, err := New(cfg)
		if err != nil {
			return err
		}
		return srv.Start(context.Background())
	}
	require.ErrorContains(t, startErr("s3://no-such-bucket/repo"), `bucket "no-such-bucket" does not exist`)
	require.ErrorContains(t, startErr("s3://BAD/repo"), "bucket name")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
	require.ErrorContains(t, startErr("s3://models/repo"), "refused")
	t.Setenv("AWS_SECRET_ACCESS_KEY", s3srv.SecretKey)
	s3srv.Stop()
	require.ErrorContains(t, startErr("s3://models/repo"), "unreachable")
	cfg := testConfig(t.TempDir(), Config{})
	cfg.RepositoryCache = t.TempDir()
	_, err := New(cfg)
	require.ErrorContains(t, err, "needs an s3:// model repository")
}
