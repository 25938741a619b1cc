// Package testmodels builds the model repository that Kiln's serving tests
// use, by running make_repo.py with Python torch.
package testmodels

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// Python returns the interpreter with torch: $KILN_PYTHON, the project's
// .venv, or Debian's python3.
func Python() string {
	if p := os.Getenv("KILN_PYTHON"); p != "" {
		return p
	}
	p := filepath.Join(root(), ".venv", "bin", "python")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	return "/usr/bin/python3"
}

func here() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file)
}

func root() string { return filepath.Join(here(), "..", "..", "..") }

// Build writes the test repository (see make_repo.py) into dir.
func Build(dir string) error {
	cmd := exec.Command(Python(), filepath.Join(here(), "make_repo.py"), dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("make_repo.py with %s: %v\n%s", Python(), err, out)
	}
	return nil
}
