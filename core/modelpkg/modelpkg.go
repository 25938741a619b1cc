// Package modelpkg owns the Kiln model package: a directory holding
// model.pt (the network as TorchScript, preprocessing at the start of
// forward, so raw feature columns go in; torch.jit.load reads it) and
// manifest.json (what the model takes and predicts, how it was trained and
// optimized; see Manifest). Every reader and writer of the format goes
// through it: core/train and core/optimize write packages with Write,
// core/optimize.Open reads them with Read, serving's repository.Install
// checks and copies them with Check and Copy, the model server, `kiln
// predict`/`kiln info` and Python's kiln.load load them with Load or
// LoadModule (which select the quantized engine an int8 package records),
// and Python records its class labels with WriteManifest.
//
// The package sits above core, core/data and core/nn (a Manifest holds a
// data.Preprocessor and an nn.Spec, and Load returns a *core.Module), so
// core itself does not read manifests: core.LoadQuantizedModule takes the
// engine that LoadModule here reads from the manifest. Sections whose Go
// types belong to the packages that write them (training's result and
// hyper-parameters, core/train; the optimization record, core/optimize) are
// kept as raw JSON and decoded by their owners, so that those packages can
// import this one.
package modelpkg

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
)

// Format identifies a Kiln model package; it is manifest.json's "format".
// Every package Kiln has written records it.
const Format = "kiln-model/1"

// File names inside a package directory.
const (
	// ModelFile is the TorchScript module (torch.jit.save's archive).
	ModelFile = "model.pt"
	// ManifestFile is the manifest, Manifest as indented JSON.
	ManifestFile = "manifest.json"
)

// Errors that Read, Check and Load wrap (test with errors.Is); a missing
// file wraps fs.ErrNotExist.
var (
	// ErrManifest: manifest.json does not parse, or lacks what every
	// package declares (inputs, outputs, the model file).
	ErrManifest error = &core.Error{Code: core.InvalidArgument, Message: "invalid manifest"}
	// ErrFormat: manifest.json's format is not Format.
	ErrFormat error = &core.Error{Code: core.InvalidArgument, Message: "unknown model package format"}
)

// TensorInfo describes one input or output of a packaged model.
type TensorInfo struct {
	// Name is the tensor's name ("x" for inputs, "y" for outputs as Kiln
	// writes them); the serving configuration uses it.
	Name string `json:"name"`
	// DType is the element type, a torch dtype name ("float32").
	DType string `json:"dtype"`
	// Shape has one entry per dimension; -1 is the batch dimension.
	Shape []int64 `json:"shape"`
	// Columns describes each raw input column (inputs only).
	Columns []data.FeatureInfo `json:"columns,omitempty"`
	// Meaning of the values (outputs only), e.g. "logits".
	Meaning string `json:"meaning,omitempty"`
}

// Lineage records where a model came from.
type Lineage struct {
	// DataSHA256 is the hex SHA-256 fingerprint of the training table
	// (data.Table.Fingerprint); DataSource says where it was read from.
	DataSHA256 string `json:"data_sha256"`
	DataSource string `json:"data_source,omitempty"`
	// Rows is the table's row count, SplitRows the train, validation and
	// test rows.
	Rows      int    `json:"rows"`
	SplitRows [3]int `json:"split_rows"`
	// Split is how the rows were split (with Seed it reproduces the
	// splits; absent from packages written before it was recorded).
	Split *data.SplitOptions `json:"split,omitempty"`
	Seed  uint64             `json:"seed"`
	// Hyperparameters is the training configuration as JSON
	// (core/train.Config; core/train.Hyperparameters decodes it).
	Hyperparameters json.RawMessage `json:"hyperparameters"`
	// Created is when the package was written (UTC).
	Created time.Time `json:"created"`
	// KilnVersion and TorchVersion are core.Version and
	// core.TorchVersion() of the process that trained it.
	KilnVersion  string `json:"kiln_version"`
	TorchVersion string `json:"torch_version"`
}

// Manifest is manifest.json of a Kiln model package: the union of what
// core/train writes, what core/optimize adds (Optimization) and what
// Python's kiln adds (PythonLabels), with the JSON layout of format
// kiln-model/1.
type Manifest struct {
	// Format is Format.
	Format string `json:"format"`
	// Name is the model's name (its spec's), if any.
	Name string `json:"name,omitempty"`
	// Task is classification or regression.
	Task data.Task `json:"task"`
	// Model is the TorchScript file, ModelFile.
	Model string `json:"model"`
	// Inputs and Outputs are forward's tensors, in order.
	Inputs  []TensorInfo `json:"inputs"`
	Outputs []TensorInfo `json:"outputs"`
	// Labels are a classifier's class names in output order, as text.
	Labels []string `json:"labels,omitempty"`
	// PythonLabels are the same labels with the Python types fit was given
	// (ints, strings, bools) as a JSON list, recorded by Python's kiln
	// (kiln.Model.classes_ returns them); Go does not read them.
	PythonLabels json.RawMessage `json:"python_labels,omitempty"`
	// Metrics maps a split ("val", "test") to metric name to value (see
	// core/train.Metrics).
	Metrics map[string]map[string]float64 `json:"metrics"`
	// Parameters is the number of trainable parameter elements.
	Parameters int64 `json:"parameters"`
	// Spec is the network (core/nn) that model.pt holds.
	Spec nn.Spec `json:"spec"`
	// Preprocessing is the preprocessing fitted on the training split,
	// compiled into model.pt's forward.
	Preprocessing *data.Preprocessor `json:"preprocessing"`
	// Training is training's result as JSON (core/train.Result), or null.
	Training json.RawMessage `json:"training"`
	// Lineage records the data and configuration the model came from.
	Lineage Lineage `json:"lineage"`
	// Optimization is the record of core/optimize as JSON
	// (core/optimize.Record), absent from packages it did not write.
	// QuantizedEngine reads the engine an int8 package was packed for.
	Optimization json.RawMessage `json:"optimization,omitempty"`
}

// Validate reports why m cannot be a Kiln model package's manifest: a
// format other than Format (ErrFormat), a model file other than ModelFile
// ("" reads as ModelFile), no inputs or outputs, a tensor without name,
// dtype or shape, or an optimization record that is not a JSON object
// (ErrManifest).
func (m *Manifest) Validate() error {
	if m.Format != Format {
		return fmt.Errorf("%w %q (want %q)", ErrFormat, m.Format, Format)
	}
	if m.Model != "" && m.Model != ModelFile {
		return fmt.Errorf("%w: model %q: a Kiln model package's model is %s", ErrManifest, m.Model, ModelFile)
	}
	if len(m.Inputs) == 0 || len(m.Outputs) == 0 {
		return fmt.Errorf("%w: it declares %d inputs and %d outputs (want at least one of each)", ErrManifest, len(m.Inputs), len(m.Outputs))
	}
	for _, side := range []struct {
		kind string
		ts   []TensorInfo
	}{{"input", m.Inputs}, {"output", m.Outputs}} {
		kind := side.kind
		for i, t := range side.ts {
			if t.Name == "" || t.DType == "" || len(t.Shape) == 0 {
				return fmt.Errorf("%w: %s %d (%q) needs a name, a dtype and a shape", ErrManifest, kind, i, t.Name)
			}
			for _, d := range t.Shape {
				if d < -1 {
					return fmt.Errorf("%w: %s %q has dimension %d in shape %v", ErrManifest, kind, t.Name, d, t.Shape)
				}
			}
		}
	}
	if _, err := m.QuantizedEngine(); err != nil {
		return err
	}
	return nil
}

// QuantizedEngine returns the quantized engine that the int8 weights of
// model.pt were packed for ("qnnpack", "onednn", "fbgemm", "x86"), as
// core/optimize records it in Optimization, or "" when the package
// records none (float packages). A record that is not a JSON object is
// ErrManifest.
func (m *Manifest) QuantizedEngine() (string, error) {
	return optimizationEngine(m.Optimization)
}

// optimizationEngine reads "engine" from an optimization record.
func optimizationEngine(raw json.RawMessage) (string, error) {
	if len(bytes.TrimSpace(raw)) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return "", nil
	}
	var rec struct {
		Engine string `json:"engine"`
	}
	if err := json.Unmarshal(raw, &rec); err != nil {
		return "", fmt.Errorf("%w: optimization: %w", ErrManifest, err)
	}
	return rec.Engine, nil
}

// Decode parses manifest.json's bytes and validates them (see Validate).
// Fields it does not know are ignored.
func Decode(b []byte) (Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("%w: %w", ErrManifest, err)
	}
	if err := m.Validate(); err != nil {
		return Manifest{}, err
	}
	return m, nil
}

// Encode returns m as manifest.json's bytes: indented JSON and a newline.
func Encode(m Manifest) ([]byte, error) {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrManifest, err)
	}
	return append(b, '\n'), nil
}

// Read reads and validates the manifest of the package in dir. Errors
// name the file: a missing one wraps fs.ErrNotExist, an invalid one
// ErrManifest or ErrFormat.
func Read(dir string) (Manifest, error) {
	p := filepath.Join(dir, ManifestFile)
	b, err := os.ReadFile(p)
	if err != nil {
		return Manifest{}, fmt.Errorf("kiln: model package %s: %w", dir, err)
	}
	m, err := Decode(b)
	if err != nil {
		return Manifest{}, fmt.Errorf("kiln: model package %s: %w", p, err)
	}
	return m, nil
}

// Write writes a Kiln model package into dir (created if missing): mod
// saved as model.pt as it is (the caller switches it to eval mode), then
// m as manifest.json, with Model set to ModelFile and Format to Format
// when empty. Each file is written under a temporary name, synced and
// renamed into place, model.pt first, so that a complete manifest.json
// means a complete package; the directory is synced last. An m that does
// not validate writes nothing.
func Write(dir string, mod *core.Module, m Manifest) error {
	b, err := prepare(dir, &m)
	if err != nil {
		return err
	}
	if mod == nil {
		return fmt.Errorf("kiln: write model package %s: no module", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("kiln: write model package: %w", err)
	}
	err = atomicfile.Write(filepath.Join(dir, ModelFile), 0o644, func(tmp string) error { return mod.Save(tmp) })
	if err == nil {
		err = writeFile(filepath.Join(dir, ManifestFile), b)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("kiln: write model package %s: %w", dir, err)
	}
	return nil
}

// WriteManifest replaces the manifest of the package in dir with m (Model
// and Format filled in as Write does), atomically; model.pt stays.
func WriteManifest(dir string, m Manifest) error {
	b, err := prepare(dir, &m)
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, ManifestFile), b); err != nil {
		return fmt.Errorf("kiln: write model package %s: %w", dir, err)
	}
	return nil
}

// prepare fills in m's Model and Format and encodes it.
func prepare(dir string, m *Manifest) ([]byte, error) {
	m.Model = ModelFile
	if m.Format == "" {
		m.Format = Format
	}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("kiln: write model package %s: %s: %w", dir, ManifestFile, err)
	}
	b, err := Encode(*m)
	if err != nil {
		return nil, fmt.Errorf("kiln: write model package %s: %s: %w", dir, ManifestFile, err)
	}
	return b, nil
}

// Load reads the package in dir and loads its model, under the quantized
// engine the manifest records (see Manifest.QuantizedEngine); an engine
// this libtorch lacks is an error, and so is a forward that does not take
// as many arguments as the manifest declares inputs. Errors name the file
// at fault. The caller closes the module.
func Load(dir string) (*core.Module, Manifest, error) {
	m, err := Read(dir)
	if err != nil {
		return nil, Manifest{}, err
	}
	engine, _ := m.QuantizedEngine() // validated by Read
	mod, err := core.LoadQuantizedModule(filepath.Join(dir, ModelFile), engine)
	if err != nil {
		return nil, Manifest{}, fmt.Errorf("kiln: model package %s: %w", dir, err)
	}
	if got := len(mod.Inputs()); got != len(m.Inputs) {
		mod.Close()
		return nil, Manifest{}, fmt.Errorf("kiln: model package %s: %w: %s's forward takes %d arguments, %s declares %d inputs",
			dir, ErrManifest, ModelFile, got, ManifestFile, len(m.Inputs))
	}
	return mod, m, nil
}

// LoadModule loads a model from path: a package directory (as Load), or
// a TorchScript file. A file that is the model of a package, that is one
// whose directory holds a manifest.json naming it (or naming no model
// file), loads under the quantized engine that manifest records, as the
// model server loads <version>/model.pt; without a manifest next to it,
// or with one that is not JSON, it loads under the current engine. The
// caller closes the module.
func LoadModule(path string) (*core.Module, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		mod, _, err := Load(path)
		return mod, err
	}
	return core.LoadQuantizedModule(path, siblingEngine(path))
}

// siblingEngine returns the quantized engine recorded by the manifest.json
// next to the file path, when it names path's file or no model file; ""
// when there is no manifest, it is not JSON, or it names another file.
// Only "model" and "optimization.engine" are read, so that a manifest of
// any age or completeness that records an engine has it applied.
func siblingEngine(path string) string {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(path), ManifestFile))
	if err != nil {
		return ""
	}
	var h struct {
		Model        string          `json:"model"`
		Optimization json.RawMessage `json:"optimization"`
	}
	if json.Unmarshal(b, &h) != nil || (h.Model != "" && h.Model != filepath.Base(path)) {
		return ""
	}
	engine, _ := optimizationEngine(h.Optimization) // not an object: no engine
	return engine
}

// Check verifies the package in dir and returns its manifest: both files
// present, manifest.json parses and validates (known format, inputs and
// outputs declared), and model.pt loads (under its quantized engine) with
// a forward that takes as many arguments as the manifest declares inputs
// (see Load). Errors name the file at fault; a missing file wraps
// fs.ErrNotExist, an invalid manifest ErrManifest or ErrFormat.
func Check(dir string) (Manifest, error) {
	mod, m, err := Load(dir)
	if err != nil {
		return Manifest{}, err
	}
	mod.Close()
	return m, nil
}

// Copy copies the package in src (model.pt and manifest.json, after Read
// validates the manifest) into dst, creating it if missing; each file is
// written under a temporary name, synced and renamed into place, model.pt
// first. It returns the manifest.
func Copy(src, dst string) (Manifest, error) {
	m, err := Read(src)
	if err != nil {
		return Manifest{}, err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return Manifest{}, fmt.Errorf("kiln: copy model package %s: %w", src, err)
	}
	for _, f := range []string{ModelFile, ManifestFile} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err == nil {
			err = writeFile(filepath.Join(dst, f), b)
		}
		if err != nil {
			return Manifest{}, fmt.Errorf("kiln: copy model package %s to %s: %w", src, dst, err)
		}
	}
	if err := syncDir(dst); err != nil {
		return Manifest{}, fmt.Errorf("kiln: copy model package %s to %s: %w", src, dst, err)
	}
	return m, nil
}

// writeFile replaces path with b atomically (package internal/atomicfile).
func writeFile(path string, b []byte) error {
	return atomicfile.WriteFile(path, b, 0o644)
}

// syncDir syncs a directory so that renames into it are durable; file
// systems that cannot sync a directory are not an error.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, fs.ErrInvalid) && !errors.Is(err, errors.ErrUnsupported) {
		return err
	}
	return nil
}
