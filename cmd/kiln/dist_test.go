package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMain lets the test binary act as the kiln command when
// KILN_TEST_MAIN=1, so that launchers (kiln train --nproc-per-node,
// torchrun --no_python) can start it as their ranks.
func TestMain(m *testing.M) {
	if os.Getenv("KILN_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// distJob writes a small classification spec and data set; it returns the
// arguments of `kiln train` writing the package to out.
func distJob(t *testing.T, out string) []string {
	dir := t.TempDir()
	spec := filepath.Join(dir, "spec.yaml")
	require.NoError(t, os.WriteFile(spec, []byte(`
model:
  layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]
split: {val: 0.2, test: 0.2, stratify: true}
train: {epochs: 8, batch_size: 16, seed: 1, optimizer: {type: adam, lr: 0.01}}
`), 0o644))
	return []string{"train", "--spec", spec, "--data", blobsCSV(t), "--target", "cls", "--out", out, "--quiet"}
}

// runAsKiln runs this test binary as `kiln args...`.
func runAsKiln(t *testing.T, name string, args ...string) (string, string, error) {
	t.Helper()
	c := exec.Command(name, args...)
	c.Env = append(os.Environ(), "KILN_TEST_MAIN=1")
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	err := c.Run()
	return stdout.String(), stderr.String(), err
}

func TestTrainNprocPerNode(t *testing.T) {
	t.Setenv("OMP_NUM_THREADS", "") // unset: the launcher gives each rank one thread, as torchrun
	t.Setenv("KILN_NUM_THREADS", "")
	out := filepath.Join(t.TempDir(), "pkg")
	args := append(distJob(t, out), "--nproc-per-node", "2", "--master-port", strconv.Itoa(freePort(t)))
	stdout, stderr, err := runAsKiln(t, os.Args[0], args...)
	require.NoError(t, err, stderr)
	assert.Contains(t, stdout, "trained 8 epochs")
	assert.Contains(t, stdout, "test        accuracy 1.0000")
	assert.Contains(t, stderr, "rank=1 world_size=2 backend=gloo threads=1")
	assert.Contains(t, stderr, "rank=0 world_size=2 backend=gloo threads=1")
	assert.FileExists(t, filepath.Join(out, "model.pt"))
	assert.FileExists(t, filepath.Join(out, "manifest.json"))
}

// torchrun (Debian's python3-torch) starts two ranks of kiln train
// unchanged: they join torchrun's agent store as clients.
func TestTorchrunLaunchesTrain(t *testing.T) {
	torchrun, err := exec.LookPath("torchrun")
	if err != nil {
		t.Skip("torchrun not installed (scripts/install-deps installs python3-torch)")
	}
	out := filepath.Join(t.TempDir(), "pkg")
	// Debian's torch 1.13 on Python 3.11 cannot parse torchrun's default
	// --redirects 0 / --tee 0 (Std.from_str returns None: 3.11's IntFlag
	// iteration skips NONE); any non-zero value works.
	args := append([]string{"--no_python", "--nproc_per_node", "2", "--master_port", strconv.Itoa(freePort(t)),
		"--redirects", "2", "--tee", "2", os.Args[0]},
		distJob(t, out)...)
	stdout, stderr, err := runAsKiln(t, torchrun, args...)
	require.NoError(t, err, stderr)
	assert.Contains(t, stdout, "trained 8 epochs")
	assert.Contains(t, stderr, "agent_store=true")
	assert.FileExists(t, filepath.Join(out, "model.pt"))
}
