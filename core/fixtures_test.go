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

func TestMain(m *testing.M) { testkit.MainWithFixture(m, "torch-models", &fixtureDir, readManifest) }

// readManifest reads fixtureDir's manifest.json into fixtures.
func readManifest() error {
	raw, err := os.ReadFile(filepath.Join(fixtureDir, "manifest.json"))
	if err != nil {
		return err
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(raw, &all); err != nil {
		return fmt.Errorf("%s: %w", filepath.Join(fixtureDir, "manifest.json"), err)
	}
	fixtures = map[string]fixture{}
	for k, v := range all {
		var f fixture
		if json.Unmarshal(v, &f) == nil && f.File != "" {
			fixtures[k] = f
		}
	}
	return nil
}

func fixturePath(name string) string { return filepath.Join(fixtureDir, name) }
