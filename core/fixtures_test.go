package core_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnml/kiln/internal/testkit"
)

// fixtureDir holds the models kiln_fixtures.py torch-models exported with
// Python torch for this test run.
var fixtureDir string

type tensorFile struct {
	File  string  `json:"file"`
	DType string  `json:"dtype"`
	Shape []int64 `json:"shape"`
}

type fixture struct {
	File    string       `json:"file"`
	Inputs  []tensorFile `json:"inputs"`
	Outputs []tensorFile `json:"outputs"`
}

var fixtures map[string]fixture

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "kiln-fixtures-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := testkit.MakeFixture("torch-models", dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	raw, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(raw, &all); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fixtures = map[string]fixture{}
	for k, v := range all {
		var f fixture
		if json.Unmarshal(v, &f) == nil && f.File != "" {
			fixtures[k] = f
		}
	}
	fixtureDir = dir
	return m.Run()
}

func fixturePath(name string) string { return filepath.Join(fixtureDir, name) }
