package evaluate

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
)

// Package is a model package taken part in an evaluation: where it was
// found and its manifest, read and checked by OpenPackage.
type Package struct {
	// Role is "candidate" or "baseline" (it names the model in errors).
	Role string `json:"role"`
	// Ref is the reference the user gave (a path today; a registry
	// reference such as models:/NAME/ALIAS once the registry resolves
	// them), Dir the package directory it resolved to.
	Ref string `json:"ref"`
	Dir string `json:"dir"`
	// Manifest is the package's manifest.json.
	Manifest modelpkg.Manifest `json:"-"`
}

// OpenPackage reads and checks the manifest of the Kiln model package in
// dir (modelpkg.Read) for role ("candidate" or "baseline"; ref is what
// the user named it by). It does not load model.pt (Prepare does). dir may
// also name the package's model.pt or manifest.json.
//
// Errors: NotFound when dir or its manifest.json does not exist;
// InvalidArgument when the manifest is invalid, lacks the preprocessing
// section (the raw columns the model takes; every package core/train and
// core/optimize write has one), is neither classification nor regression,
// or declares other than one input of raw feature columns and one output.
func OpenPackage(role, ref, dir string) (*Package, error) {
	if st, err := os.Stat(dir); err == nil && !st.IsDir() {
		switch filepath.Base(dir) {
		case modelpkg.ModelFile, modelpkg.ManifestFile:
			dir = filepath.Dir(dir)
		default:
			return nil, core.Errorf(core.InvalidArgument,
				"kiln: evaluate: %s %s is a file; evaluate takes a Kiln model package (a directory with %s and %s)",
				role, ref, modelpkg.ModelFile, modelpkg.ManifestFile)
		}
	} else if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, core.Errorf(core.NotFound, "kiln: evaluate: %s %s: no such model package", role, ref)
		}
		return nil, fmt.Errorf("kiln: evaluate: %s %s: %w", role, ref, err)
	}
	m, err := modelpkg.Read(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, core.Errorf(core.NotFound, "kiln: evaluate: %s %s is not a Kiln model package: %v", role, ref, err)
		}
		return nil, fmt.Errorf("kiln: evaluate: %s %s: %w", role, ref, err)
	}
	p := &Package{Role: role, Ref: ref, Dir: dir, Manifest: m}
	if err := p.check(); err != nil {
		return nil, err
	}
	return p, nil
}

// check verifies what evaluation needs of the manifest.
func (p *Package) check() error {
	m := &p.Manifest
	bad := func(format string, args ...any) error {
		return core.Errorf(core.InvalidArgument, "kiln: evaluate: %s %s: "+format, append([]any{p.Role, p.Ref}, args...)...)
	}
	if m.Preprocessing == nil || len(m.Preprocessing.Features) == 0 {
		return bad("%s has no preprocessing section naming the raw input columns (packages written by kiln train, select and optimize have one)", modelpkg.ManifestFile)
	}
	if m.Task != data.Classification && m.Task != data.Regression {
		return bad("task %q: evaluate compares classification or regression models", m.Task)
	}
	if len(m.Inputs) != 1 || len(m.Outputs) != 1 {
		return bad("it declares %d inputs and %d outputs; evaluate takes packages with one input of raw feature columns and one output", len(m.Inputs), len(m.Outputs))
	}
	in := m.Inputs[0].Shape
	if want := int64(m.Preprocessing.NumInputs()); len(in) != 2 || in[1] != want {
		return bad("input %q has shape %v, but its preprocessing names %d raw columns (want [-1, %d])", m.Inputs[0].Name, in, want, want)
	}
	w := p.outputWidth()
	switch {
	case m.Task == data.Regression && w != 1:
		return bad("a regression model with output shape %v; evaluate scores one predicted value per row", m.Outputs[0].Shape)
	case m.Task == data.Classification && len(m.Labels) < 2:
		return bad("a classifier with %d labels in its manifest (want at least 2)", len(m.Labels))
	case m.Task == data.Classification && w != 1 && w != len(m.Labels):
		return bad("output shape %v does not fit its %d labels (want one score per label, or one logit for two labels)", m.Outputs[0].Shape, len(m.Labels))
	case m.Task == data.Classification && w == 1 && len(m.Labels) != 2:
		return bad("one output logit but %d labels", len(m.Labels))
	}
	return nil
}

// outputWidth is the number of values per row of the output (the product
// of its non-batch dimensions).
func (p *Package) outputWidth() int {
	w := 1
	for _, d := range p.Manifest.Outputs[0].Shape[1:] {
		w *= int(d)
	}
	return w
}

// hasLogits reports whether the output is logits (Kiln writes "logits
// (...)" for multi-class and "logit of labels[1] (...)" for binary
// classifiers), so that probabilities and a log-loss can be computed.
func (p *Package) hasLogits() bool {
	return strings.HasPrefix(p.Manifest.Outputs[0].Meaning, "logit")
}

// hasProbabilities reports whether the output is probabilities (Kiln
// writes "probability of labels[1] (...)" and "probabilities (...)" for
// classifiers trained with Keras's losses on a sigmoid or softmax output).
func (p *Package) hasProbabilities() bool {
	return strings.HasPrefix(p.Manifest.Outputs[0].Meaning, "probabilit")
}

// target returns the target column the package was trained to predict.
func (p *Package) target() string { return p.Manifest.Preprocessing.Options.Target }

// missingColumns lists the package's raw input columns that t lacks.
func (p *Package) missingColumns(t *data.Table) []string {
	names := t.Names()
	var miss []string
	for _, f := range p.Manifest.Preprocessing.Features {
		if !slices.Contains(names, f.Name) {
			miss = append(miss, f.Name)
		}
	}
	return miss
}

// fileSize returns the size in bytes of the named file of the package.
func (p *Package) fileSize(name string) (int64, error) {
	st, err := os.Stat(filepath.Join(p.Dir, name))
	if err != nil {
		return 0, fmt.Errorf("kiln: evaluate: %s %s: %w", p.Role, p.Ref, err)
	}
	return st.Size(), nil
}
