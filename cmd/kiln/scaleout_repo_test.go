package main

import (
	"context"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/serving/repository/s3repo"
)

// scaleOutRepo is the replicas' shared model repository: s3://models/repo
// on a real S3 server (versitygw, testkit.S3). The server listens on
// loopback, which a network namespace cannot reach; each replica reaches it
// through a TCP relay on its namespace's host address (the node's view of
// an S3 endpoint in another network).
type scaleOutRepo struct {
	srv       *testkit.S3Server
	endpoints []string // replica i's AWS_ENDPOINT_URL_S3
}

const scaleOutBucket, scaleOutPrefix = "models", "repo"

func newScaleOutRepo(t *testing.T, nss []*testkit.NetNS) *scaleOutRepo {
	t.Helper()
	srv := testkit.S3(t)
	srv.CreateBucket(t, scaleOutBucket)
	u, err := url.Parse(srv.Endpoint)
	require.NoError(t, err)
	r := &scaleOutRepo{srv: srv}
	for _, ns := range nss {
		r.endpoints = append(r.endpoints, "http://"+relayTCP(t, net.JoinHostPort(ns.Host.String(), "0"), u.Host))
	}
	return r
}

// relayTCP accepts connections on listen and copies each both ways to
// target until either side closes; it stops in t.Cleanup. It returns the
// address it listens on.
func relayTCP(t *testing.T, listen, target string) string {
	t.Helper()
	l, err := net.Listen("tcp", listen)
	require.NoError(t, err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	track := func(c net.Conn, on bool) {
		mu.Lock()
		defer mu.Unlock()
		if on {
			conns[c] = true
		} else {
			delete(conns, c)
		}
	}
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer up.Close()
				track(c, true)
				track(up, true)
				defer track(c, false)
				defer track(up, false)
				done := make(chan struct{}, 2)
				cp := func(dst, src net.Conn) {
					_, _ = io.Copy(dst, src)
					if tc, ok := dst.(*net.TCPConn); ok {
						_ = tc.CloseWrite()
					}
					done <- struct{}{}
				}
				go cp(up, c)
				go cp(c, up)
				<-done
				<-done
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return l.Addr().String()
}

// uri is the --model-repository of replica i.
func (r *scaleOutRepo) uri(int) string { return "s3://" + scaleOutBucket + "/" + scaleOutPrefix }

// env is the environment of replica i: the S3 server's credentials, its
// endpoint as seen from the replica's namespace, no host AWS files.
func (r *scaleOutRepo) env(i int) []string {
	var env []string
	for k, v := range r.srv.Env() {
		if k == "AWS_ENDPOINT_URL_S3" {
			v = r.endpoints[i]
		}
		env = append(env, k+"="+v)
	}
	return append(env, "AWS_PROFILE=", "AWS_ENDPOINT_URL=", "AWS_SESSION_TOKEN=")
}

// putModel uploads a model directory (config and versions; the versions'
// completion markers last) to the repository.
func (r *scaleOutRepo) putModel(t *testing.T, model, config string, versions map[int]string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), model)
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.yaml"), []byte(config), 0o644))
	for v, src := range versions {
		require.NoError(t, os.CopyFS(filepath.Join(dir, strconv.Itoa(v)), os.DirFS(src)))
	}
	_, err := s3repo.Push(context.Background(), r.srv.Client(), dir,
		s3repo.Location{Bucket: scaleOutBucket, Prefix: scaleOutPrefix + "/" + model}, s3repo.PushOptions{})
	require.NoError(t, err)
}

// putVersion uploads one version directory; it becomes visible to the
// replicas when its completion marker, written last, is there.
func (r *scaleOutRepo) putVersion(t *testing.T, model string, version int, src string) {
	t.Helper()
	_, err := s3repo.PushVersion(context.Background(), r.srv.Client(), src,
		s3repo.Location{Bucket: scaleOutBucket, Prefix: scaleOutPrefix + "/" + model + "/" + strconv.Itoa(version)}, s3repo.PushOptions{})
	require.NoError(t, err)
}
