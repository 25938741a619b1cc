package train_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/internal/testkit"
)

func TestMain(m *testing.M) {
	// A child process of the kill -9 test trains and gets killed: it
	// needs no data export of its own.
	if os.Getenv("KILN_TRAIN_CHILD") != "" {
		os.Exit(m.Run())
	}
	testkit.Main(m)
}

// dataDir returns the directory of the scikit-learn data sets
// kiln_fixtures.py datasets exports, made on first use (once per test
// binary), so that fuzz targets, which need none, start without it.
func dataDir(t testing.TB) string { return testkit.Fixture(t, "datasets") }

func loadCSV(t *testing.T, name string) *data.Table {
	t.Helper()
	tb, err := data.ReadCSVFile(filepath.Join(dataDir(t), name))
	require.NoError(t, err)
	return tb
}

func stringsReader(s string) *strings.Reader { return strings.NewReader(s) }
