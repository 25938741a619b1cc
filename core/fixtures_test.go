package core_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// fixtureDir holds the models tests/fixtures/make_models.py exported with
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

// pythonBin is the interpreter with torch: $KILN_PYTHON, the project's
// virtualenv, or Debian's python3.
func pythonBin() string {
	if p := os.Getenv("KILN_PYTHON"); p != "" {
		return p
	}
	if p, err := filepath.Abs("../.venv/bin/python"); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/usr/bin/python3"
}

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
	cmd := exec.Command(pythonBin(), "../tests/fixtures/make_models.py", dir)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "exporting fixtures with %s: %v\n", pythonBin(), err)
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
