package train_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/data"
)

// dataDir holds the scikit-learn data sets tests/fixtures/make_datasets.py
// exported for this run.
var dataDir string

func pythonBin() string {
	if p := os.Getenv("KILN_PYTHON"); p != "" {
		return p
	}
	if p, err := filepath.Abs("../../.venv/bin/python"); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/usr/bin/python3"
}

func TestMain(m *testing.M) {
	// A child process of the kill -9 test trains and gets killed: it
	// needs no data export of its own.
	if os.Getenv("KILN_TRAIN_CHILD") != "" {
		os.Exit(m.Run())
	}
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "kiln-datasets-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	cmd := exec.Command(pythonBin(), "../../tests/fixtures/make_datasets.py", dir)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "exporting data sets with %s: %v\n", pythonBin(), err)
		return 1
	}
	dataDir = dir
	return m.Run()
}

func loadCSV(t *testing.T, name string) *data.Table {
	t.Helper()
	tb, err := data.ReadCSVFile(filepath.Join(dataDir, name))
	require.NoError(t, err)
	return tb
}

func stringsReader(s string) *strings.Reader { return strings.NewReader(s) }
