package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// kiln info checks a package directory (core/modelpkg.Check) and
// describes a TorchScript file.
func TestInfo(t *testing.T) {
	run := func(arg string) (string, error) {
		cmd := newInfoCmd()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs([]string{arg})
		err := cmd.Execute()
		return out.String(), err
	}
	pkg := "../../core/modelpkg/testdata/v1-int8"
	out, err := run(pkg)
	require.NoError(t, err, out)
	assert.Contains(t, out, "package    "+pkg+" (kiln-model/1)\nname       tiny\ntask       classification\nlabels     x, y\nengine     qnnpack\n")
	assert.Contains(t, out, "input 0    x: Tensor")
	out, err = run(filepath.Join(pkg, "model.pt"))
	require.NoError(t, err, out)
	assert.NotContains(t, out, "package")
	assert.Contains(t, out, "parameters ")

	broken := t.TempDir()
	b, err := os.ReadFile(filepath.Join(pkg, "model.pt"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(broken, "model.pt"), b, 0o644))
	_, err = run(broken)
	assert.ErrorContains(t, err, "manifest.json: no such file or directory")
}
