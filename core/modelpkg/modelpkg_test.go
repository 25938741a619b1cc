package modelpkg_test

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	nopt "github.com/kilnml/kiln/native/optimize"
)

// testdata/v1-float and testdata/v1-int8 are packages written by the code
// before this package existed: core/train.SavePackage (a 3-column, 2-class
// MLP) and core/optimize.SavePackage (that model, dynamic int8 for
// qnnpack).
const (
	legacyFloat = "testdata/v1-float"
	legacyInt8  = "testdata/v1-int8"
)

// copyDir copies the package files of src into a new temporary directory.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	for _, f := range []string{modelpkg.ModelFile, modelpkg.ManifestFile} {
		b, err := os.ReadFile(filepath.Join(src, f))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dst, f), b, 0o644))
	}
	return dst
}

// forward runs m on three fixed rows of the legacy packages' 3 columns.
func forward(t *testing.T, m *core.Module) []float32 {
	t.Helper()
	x, err := core.NewTensor([]float32{1, 2, 0, 5, 4, 1, 0, 0, 0}, 3, 3)
	require.NoError(t, err)
	defer x.Close()
	outs, err := m.Forward(x)
	require.NoError(t, err)
	defer core.CloseAll(outs)
	assert.Equal(t, []int64{3, 2}, outs[0].Shape())
	y, err := core.CopyData[float32](outs[0])
	require.NoError(t, err)
	return y
}

// asJSON decodes b into generic JSON values.
func asJSON(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	require.NoError(t, json.Unmarshal(b, &v))
	return v
}

func TestLegacyPackagesLoad(t *testing.T) {
	for _, dir := range []string{legacyFloat, legacyInt8} {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			m, err := modelpkg.Read(dir)
			require.NoError(t, err)
			assert.Equal(t, modelpkg.Format, m.Format)
			assert.Equal(t, "tiny", m.Name)
			assert.Equal(t, modelpkg.ModelFile, m.Model)
			assert.Equal(t, []string{"x", "y"}, m.Labels)
			assert.Equal(t, []int64{-1, 3}, m.Inputs[0].Shape)
			assert.Equal(t, []string{"blue", "red"}, m.Inputs[0].Columns[2].Categories)
			assert.Equal(t, []int64{-1, 2}, m.Outputs[0].Shape)
			assert.Contains(t, m.Metrics["test"], "accuracy")
			assert.Equal(t, 60, m.Lineage.Rows)
			hp, err := train.Hyperparameters(&m)
			require.NoError(t, err)
			assert.Equal(t, "adam", hp.Optimizer.Type)
			assert.Equal(t, 2, hp.Epochs)
			var res train.Result
			require.NoError(t, json.Unmarshal(m.Training, &res))

			// The layout is kept: re-encoding gives the same JSON.
			raw, err := os.ReadFile(filepath.Join(dir, modelpkg.ManifestFile))
			require.NoError(t, err)
			enc, err := modelpkg.Encode(m)
			require.NoError(t, err)
			assert.Equal(t, asJSON(t, raw), asJSON(t, enc))

			checked, err := modelpkg.Check(dir)
			require.NoError(t, err)
			assert.Equal(t, m, checked)
			mod, loaded, err := modelpkg.Load(dir)
			require.NoError(t, err)
			defer mod.Close()
			assert.Equal(t, m, loaded)
			forward(t, mod)
		})
	}
}

func TestInt8LoadsUnderItsEngine(t *testing.T) {
	m, err := modelpkg.Read(legacyInt8)
	require.NoError(t, err)
	engine, err := m.QuantizedEngine()
	require.NoError(t, err)
	assert.Equal(t, "qnnpack", engine)
	var rec optimize.Record
	require.NoError(t, json.Unmarshal(m.Optimization, &rec))
	assert.Equal(t, "dynamic", rec.Method)
	assert.Equal(t, optimize.Int8, rec.Quantize)

	engines, err := optimize.Engines()
	require.NoError(t, err)
	if len(engines) < 2 {
		t.Skipf("this libtorch has one quantized engine (%v)", engines)
	}
	other := engines[0]
	if other == "qnnpack" {
		other = engines[1]
	}
	prev, err := nopt.QEngine()
	require.NoError(t, err)
	require.NoError(t, nopt.SetQEngine(other))
	defer nopt.SetQEngine(prev)

	// Load and LoadModule (the package, or its model file) select the
	// recorded engine and put the process's back.
	mod, _, err := modelpkg.Load(legacyInt8)
	require.NoError(t, err)
	want := forward(t, mod)
	mod.Close()
	for _, p := range []string{legacyInt8, filepath.Join(legacyInt8, modelpkg.ModelFile)} {
		mod, err := modelpkg.LoadModule(p)
		require.NoError(t, err, p)
		assert.Equal(t, want, forward(t, mod), p)
		mod.Close()
		cur, err := nopt.QEngine()
		require.NoError(t, err)
		assert.Equal(t, other, cur)
	}

	// An engine this libtorch lacks is an error, from the package and its file.
	dir := copyDir(t, legacyInt8)
	man := m
	man.Optimization = json.RawMessage(`{"engine": "no-such-engine", "quantize": "int8"}`)
	require.NoError(t, modelpkg.WriteManifest(dir, man))
	_, _, err = modelpkg.Load(dir)
	assert.ErrorContains(t, err, `(int8 for the no-such-engine engine)`)
	_, err = modelpkg.LoadModule(filepath.Join(dir, modelpkg.ModelFile))
	assert.ErrorContains(t, err, `(int8 for the no-such-engine engine)`)
	_, err = modelpkg.Check(dir)
	assert.ErrorContains(t, err, `(int8 for the no-such-engine engine)`)
}

func TestLoadModuleOfAFile(t *testing.T) {
	// A TorchScript file without a manifest, or next to one that is not
	// JSON, loads as it is.
	dir := t.TempDir()
	b, err := os.ReadFile(filepath.Join(legacyFloat, modelpkg.ModelFile))
	require.NoError(t, err)
	p := filepath.Join(dir, "net.pt")
	require.NoError(t, os.WriteFile(p, b, 0o644))
	m, err := modelpkg.LoadModule(p)
	require.NoError(t, err)
	m.Close()
	require.NoError(t, os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), []byte("not json"), 0o644))
	m, err = modelpkg.LoadModule(p)
	require.NoError(t, err)
	m.Close()
	// A manifest naming another file does not apply to this one.
	require.NoError(t, os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile),
		[]byte(`{"model": "model.pt", "optimization": {"engine": "no-such-engine"}}`), 0o644))
	m, err = modelpkg.LoadModule(p)
	require.NoError(t, err)
	m.Close()
	_, err = modelpkg.LoadModule(filepath.Join(dir, "missing.pt"))
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestWriteReadLoadRoundTrip(t *testing.T) {
	mod, m, err := modelpkg.Load(legacyFloat)
	require.NoError(t, err)
	defer mod.Close()
	want := forward(t, mod)

	dir := filepath.Join(t.TempDir(), "new", "pkg")
	m.Name = "renamed"
	m.Model, m.Format = "", "" // Write fills them in
	require.NoError(t, modelpkg.Write(dir, mod, m))
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
		info, err := e.Info()
		require.NoError(t, err)
		assert.Equal(t, fs.FileMode(0o644), info.Mode().Perm(), e.Name())
	}
	assert.Equal(t, []string{modelpkg.ManifestFile, modelpkg.ModelFile}, names, "no temporary files left")

	got, err := modelpkg.Read(dir)
	require.NoError(t, err)
	m.Model, m.Format = modelpkg.ModelFile, modelpkg.Format
	assert.Equal(t, m, got)
	mod2, got2, err := modelpkg.Load(dir)
	require.NoError(t, err)
	defer mod2.Close()
	assert.Equal(t, m, got2)
	assert.Equal(t, want, forward(t, mod2))

	// WriteManifest replaces the manifest only; Copy copies both files.
	got.PythonLabels = json.RawMessage(`[0, 1]`)
	require.NoError(t, modelpkg.WriteManifest(dir, got))
	dst := filepath.Join(t.TempDir(), "copy")
	copied, err := modelpkg.Copy(dir, dst)
	require.NoError(t, err)
	assert.JSONEq(t, `[0, 1]`, string(copied.PythonLabels))
	again, err := modelpkg.Check(dst)
	require.NoError(t, err)
	assert.Equal(t, copied, again)
	a, err := os.ReadFile(filepath.Join(dir, modelpkg.ModelFile))
	require.NoError(t, err)
	b, err := os.ReadFile(filepath.Join(dst, modelpkg.ModelFile))
	require.NoError(t, err)
	assert.Equal(t, a, b)

	// A manifest that does not validate writes nothing.
	bad := filepath.Join(t.TempDir(), "bad")
	m.Inputs = nil
	err = modelpkg.Write(bad, mod, m)
	assert.ErrorIs(t, err, modelpkg.ErrManifest)
	_, err = os.Stat(bad)
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestCheckErrors(t *testing.T) {
	man, err := modelpkg.Read(legacyFloat)
	require.NoError(t, err)
	edit := func(f func(m map[string]any)) []byte {
		raw, err := os.ReadFile(filepath.Join(legacyFloat, modelpkg.ManifestFile))
		require.NoError(t, err)
		var m map[string]any
		require.NoError(t, json.Unmarshal(raw, &m))
		f(m)
		b, err := json.Marshal(m)
		require.NoError(t, err)
		return b
	}
	for _, c := range []struct {
		name   string
		break_ func(dir string)
		is     error
		msg    string
	}{
		{"no model.pt", func(dir string) { os.Remove(filepath.Join(dir, modelpkg.ModelFile)) },
			fs.ErrNotExist, "model.pt: no such file or directory"},
		{"no manifest.json", func(dir string) { os.Remove(filepath.Join(dir, modelpkg.ManifestFile)) },
			fs.ErrNotExist, "manifest.json: no such file or directory"},
		{"bad JSON", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), []byte(`{"format": "kiln-model/1",`), 0o644)
		}, modelpkg.ErrManifest, "manifest.json: invalid manifest: unexpected end of JSON input"},
		{"unknown format", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), edit(func(m map[string]any) { m["format"] = "kiln-model/2" }), 0o644)
		}, modelpkg.ErrFormat, `manifest.json: unknown model package format "kiln-model/2" (want "kiln-model/1")`},
		{"no format", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), edit(func(m map[string]any) { delete(m, "format") }), 0o644)
		}, modelpkg.ErrFormat, `unknown model package format "" (want "kiln-model/1")`},
		{"no inputs", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), edit(func(m map[string]any) { delete(m, "inputs") }), 0o644)
		}, modelpkg.ErrManifest, "manifest.json: invalid manifest: it declares 0 inputs and 1 outputs"},
		{"output without shape", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), edit(func(m map[string]any) {
				m["outputs"] = []any{map[string]any{"name": "y", "dtype": "float32"}}
			}), 0o644)
		}, modelpkg.ErrManifest, `output 0 ("y") needs a name, a dtype and a shape`},
		{"another model file", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), edit(func(m map[string]any) { m["model"] = "../x.pt" }), 0o644)
		}, modelpkg.ErrManifest, `model "../x.pt": a Kiln model package's model is model.pt`},
		{"optimization not an object", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), edit(func(m map[string]any) { m["optimization"] = 3 }), 0o644)
		}, modelpkg.ErrManifest, "optimization: json: cannot unmarshal number"},
		{"two inputs declared", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ManifestFile), edit(func(m map[string]any) {
				in := m["inputs"].([]any)
				m["inputs"] = append(in, in[0])
			}), 0o644)
		}, modelpkg.ErrManifest, "model.pt's forward takes 1 arguments, manifest.json declares 2 inputs"},
		{"model.pt not TorchScript", func(dir string) {
			os.WriteFile(filepath.Join(dir, modelpkg.ModelFile), []byte("not a zip"), 0o644)
		}, nil, "model.pt"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := copyDir(t, legacyFloat)
			_, err := modelpkg.Check(dir)
			require.NoError(t, err)
			c.break_(dir)
			_, err = modelpkg.Check(dir)
			require.Error(t, err)
			assert.ErrorContains(t, err, dir)
			assert.ErrorContains(t, err, c.msg)
			if c.is != nil {
				assert.ErrorIs(t, err, c.is)
			}
			_, _, lerr := modelpkg.Load(dir)
			assert.Error(t, lerr)
		})
	}
	// Read alone does not need model.pt.
	dir := copyDir(t, legacyFloat)
	require.NoError(t, os.Remove(filepath.Join(dir, modelpkg.ModelFile)))
	got, err := modelpkg.Read(dir)
	require.NoError(t, err)
	assert.Equal(t, man, got)
	_, err = modelpkg.Copy(dir, t.TempDir())
	assert.True(t, errors.Is(err, fs.ErrNotExist), "copying a package without model.pt: %v", err)
}
