package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/registry"
	"github.com/kilnml/kiln/serving/rollout"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// serveProc is a `kiln serve` process (this test binary as kiln).
type serveProc struct {
	cmd  *exec.Cmd
	http string // base URL
	logs *syncWriter
}

// startServe starts `kiln serve args...` and waits until it is ready.
func startServe(t *testing.T, args ...string) *serveProc {
	t.Helper()
	argv := append([]string{"serve", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
		"--metrics-port", "0", "--flight-port", "0", "--data-dir", t.TempDir(), "--threads", "1"}, args...)
	cmd := exec.Command(os.Args[0], argv...)
	cmd.Env = append(os.Environ(), "KILN_TEST_MAIN=1")
	logs := &syncWriter{w: new(bytes.Buffer)}
	cmd.Stderr = logs
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &serveProc{cmd: cmd, logs: logs}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("kiln serve's log:\n%s", lastLines(logs.String(), 40))
		}
	})
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "kiln serve: HTTP"):
			p.http = strings.TrimSuffix(fields[len(fields)-1], "/v2")
		case strings.HasPrefix(line, "kiln serve: ready"), strings.HasPrefix(line, "kiln serve: NOT ready"):
			go io.Copy(io.Discard, stdout)
			return p
		}
	}
	t.Fatalf("kiln serve exited before it was ready:\n%s", lastLines(logs.String(), 40))
	return nil
}

// kill9 kills the server with SIGKILL and waits for it.
func (p *serveProc) kill9(t *testing.T) {
	t.Helper()
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGKILL))
	p.cmd.Wait()
}

func (p *serveProc) rollout(t *testing.T, model string) (rollout.Status, int) {
	t.Helper()
	resp, err := http.Get(p.http + "/v2/rollouts/" + model)
	require.NoError(t, err)
	defer resp.Body.Close()
	var st rollout.Status
	if resp.StatusCode == http.StatusOK {
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&st))
	}
	return st, resp.StatusCode
}

// versions sends n unversioned REST requests to model m and counts the
// versions that answer.
func (p *serveProc) versions(t *testing.T, n int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for range n {
		resp, err := http.Post(p.http+"/v2/models/m/infer", "application/json",
			strings.NewReader(`{"inputs":[{"name":"a","datatype":"FP32","shape":[1,1],"data":[1]},`+
				`{"name":"b","datatype":"FP32","shape":[1,1],"data":[2]},{"name":"colour","datatype":"BYTES","shape":[1,1],"data":["red"]}]}`))
		require.NoError(t, err)
		var got struct {
			ModelVersion string `json:"model_version"`
			Error        string `json:"error"`
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&got))
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, got.Error)
		out[got.ModelVersion]++
	}
	return out
}

// TestRolloutFromTheRegistrySurvivesKill9: a registry model whose
// candidate alias moves is rolled out by the server itself; kill -9 during
// the rollout, and the restarted server resumes it at its step with the
// registry unchanged; a promotion that reached the registry before a kill
// is finished after the restart, serving what the registry names.
func TestRolloutFromTheRegistrySurvivesKill9(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "registry.db")
	ctx := context.Background()
	reg, err := registry.Open(ctx, db, registry.Options{})
	require.NoError(t, err)
	for i := range 2 {
		pkg := filepath.Join(t.TempDir(), "m")
		_, err := modelpkg.Copy(filepath.Join(testkit.Root(), "core", "modelpkg", "testdata", "v1-float"), pkg)
		require.NoError(t, err)
		man, err := modelpkg.Read(pkg)
		require.NoError(t, err)
		man.Name = "m-" + string(rune('a'+i)) // a different artifact per version
		require.NoError(t, modelpkg.WriteManifest(pkg, man))
		_, err = reg.RegisterVersion(ctx, "m", pkg, registry.RegisterOptions{Actor: "test"})
		require.NoError(t, err)
	}
	_, err = reg.CompareAndSwap(ctx, registry.Move{Model: "m", Alias: "production", Expected: 0, To: 1, Actor: "test"})
	require.NoError(t, err)
	_, err = reg.CompareAndSwap(ctx, registry.Move{Model: "m", Alias: rollout.CandidateAlias, Expected: 0, To: 2, Actor: "test"})
	require.NoError(t, err)
	require.NoError(t, reg.Close())

	policy := filepath.Join(dir, "rollout.yaml")
	require.NoError(t, os.WriteFile(policy, []byte("default: {steps: [30, 100], window: 1h}\n"), 0o644))
	args := []string{"--model-repository", filepath.Join(dir, "repo"), "--registry", db,
		"--registry-poll-interval", "200ms", "--rollout-state", filepath.Join(dir, "rollouts"), "--rollout-policy", policy}
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "repo"), 0o755))

	srv := startServe(t, args...)
	var st rollout.Status
	require.Eventually(t, func() bool {
		var code int
		st, code = srv.rollout(t, "m")
		return code == http.StatusOK && st.State == rollout.Running
	}, 20*time.Second, 100*time.Millisecond, "the server starts the rollout of the candidate alias by itself")
	assert.Equal(t, int64(1), st.Production)
	assert.Equal(t, int64(2), st.Candidate)
	assert.NotEmpty(t, st.RunID, "recorded as a registry run")
	seen := srv.versions(t, 200)
	t.Logf("before the kill: %v", seen)
	assert.Greater(t, seen["2"], 20)
	assert.Greater(t, seen["1"], 100)

	// kill -9 in the middle of the rollout: it resumes at its step.
	srv.kill9(t)
	srv = startServe(t, args...)
	require.Eventually(t, func() bool {
		st, _ = srv.rollout(t, "m")
		return st.State == rollout.Running && st.Live != nil
	}, 20*time.Second, 100*time.Millisecond)
	assert.Equal(t, 0, st.Step)
	seen = srv.versions(t, 200)
	t.Logf("after the restart: %v", seen)
	assert.Greater(t, seen["2"], 20, "the split is in force again")
	reg, err = registry.Open(ctx, db, registry.Options{})
	require.NoError(t, err)
	defer reg.Close()
	prod, err := reg.Alias(ctx, "m", "production")
	require.NoError(t, err)
	assert.Equal(t, 1, prod, "the registry still names production")

	// The CLI shows it.
	out, stderr, err := runAsKiln(t, os.Args[0], "rollout", "status", "m", "--url", srv.http)
	require.NoError(t, err, stderr)
	assert.Contains(t, out, "model m: running, production 1, candidate 2")

	// A kill after the promotion reached the registry: the restarted
	// server finishes the rollout and serves what the registry names.
	srv.kill9(t)
	_, err = reg.CompareAndSwap(ctx, registry.Move{Model: "m", Alias: "production", Expected: 1, To: 2, Actor: "kiln-rollout"})
	require.NoError(t, err)
	srv = startServe(t, args...)
	require.Eventually(t, func() bool {
		st, _ = srv.rollout(t, "m")
		return st.State == rollout.Promoted
	}, 20*time.Second, 100*time.Millisecond)
	assert.Equal(t, map[string]int{"2": 50}, srv.versions(t, 50))
}
