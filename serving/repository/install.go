package repository

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/kilnml/kiln/internal/atomicfile"

	yaml "go.yaml.in/yaml/v3"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
)

// DefaultInstallMaxBatchSize is the max_batch_size of the config.yaml that
// Install writes for a model the repository does not have yet, unless
// InstallOptions.MaxBatchSize says otherwise.
const DefaultInstallMaxBatchSize = 64

// InstallOptions configure Install.
type InstallOptions struct {
	// MaxBatchSize is the max_batch_size of the config.yaml written for a
	// model that is new to the repository (default
	// DefaultInstallMaxBatchSize).
	MaxBatchSize int
	// Move renames the package directory into place instead of copying
	// its files. The directory must then be on the repository's file
	// system; NewStaging makes one there.
	Move bool
	// Version, when not 0, is the version number to install as (a
	// registry's version number, so that both name the same model); a
	// version directory that exists already is ALREADY_EXISTS. 0 takes
	// the next free number.
	Version int64
}

// Installed describes a version that Install put in place.
type Installed struct {
	// Model and Version name it; Dir is its directory
	// (<repository>/<model>/<version>).
	Model   string
	Version int64
	Dir     string
	// ConfigCreated is set when Install wrote the model's config.yaml (the
	// model was new to the repository).
	ConfigCreated bool
	// Manifest is the package's manifest.json.
	Manifest modelpkg.Manifest
}

// installMu serializes version allocation and config writes of the
// installs made by this process; across processes the rename into a
// version directory that another process took first fails, and Install
// tries the next number.
var installMu sync.Mutex

// ValidModelName reports why name cannot be a model of a repository, or
// nil: a name is letters, digits, '_', '.' or '-', not starting with '.'
// or '-', so it never names a path outside the repository nor a hidden
// directory.
func ValidModelName(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("invalid model name %q: want letters, digits, '_', '.' or '-', starting with a letter, digit or '_'", name)
	}
	return nil
}

// NewStaging makes a hidden temporary directory at the top of repo
// (creating repo if needed; repositories skip hidden entries), on the same
// file system as the version directories, where a package for model can
// be written and then installed with InstallOptions.Move. It creates
// nothing in the model's directory, so a package that is never installed
// leaves no trace of the model. The caller removes it when Install failed
// or was not called (os.RemoveAll; after a successful Move it is gone).
func NewStaging(repo, model string) (string, error) {
	if err := ValidModelName(model); err != nil {
		return "", err
	}
	if err := os.MkdirAll(repo, 0o755); err != nil {
		return "", fmt.Errorf("model %q: %w", model, err)
	}
	tmp, err := os.MkdirTemp(repo, ".staging-"+model+"-")
	if err != nil {
		return "", fmt.Errorf("model %q: %w", model, err)
	}
	return tmp, nil
}

// Install puts the Kiln model package in pkgDir (model.pt and
// manifest.json, as core/train writes it; modelpkg.Check verifies it,
// loading the model) into the model repository repo as the next version
// of model. When the model has no configuration yet
// it writes config.yaml (input and output FP32 with the package's shapes
// less the batch dimension, dynamic batching, labels.txt when the output
// has one value per class label); otherwise it checks that the package
// fits the existing configuration (same inputs, outputs and labels) and
// refuses it if not. The version directory appears whole: the package is
// copied (or, with Move, renamed) into a hidden directory first and
// renamed into place; a failed install leaves the repository as it was (a
// model directory it made is removed). Python's Model.deploy and Flight's
// train action use it.
func Install(repo, model, pkgDir string, opts InstallOptions) (Installed, error) {
	if err := ValidModelName(model); err != nil {
		return Installed{}, err
	}
	man, err := modelpkg.Check(pkgDir)
	if err != nil {
		return Installed{}, fmt.Errorf("install %s: %w", pkgDir, err)
	}
	cfg, labels, err := PackageConfig(model, &man, opts.MaxBatchSize)
	if err != nil {
		return Installed{}, fmt.Errorf("model %q: %w", model, err)
	}
	staged := pkgDir
	if !opts.Move {
		if staged, err = copyPackage(repo, model, pkgDir); err != nil {
			return Installed{}, err
		}
		defer os.RemoveAll(staged) // gone after the rename; cleans up on error
	}
	modelDir := filepath.Join(repo, model)
	installMu.Lock()
	defer installMu.Unlock()
	// A model new to the repository gets its directory now; if the
	// install fails, it goes again, with the config written for it.
	made := false
	if _, err := os.Stat(modelDir); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(modelDir, 0o755); err != nil {
			return Installed{}, fmt.Errorf("model %q: %w", model, err)
		}
		made = true
	}
	undo := func() {
		if made {
			os.Remove(filepath.Join(modelDir, "config.yaml"))
			os.Remove(filepath.Join(modelDir, "labels.txt"))
			os.Remove(modelDir) // only when empty
		}
	}
	created, err := ensureConfig(modelDir, cfg, labels)
	if err != nil {
		undo()
		return Installed{}, fmt.Errorf("model %q: %w", model, err)
	}
	var v int64
	if opts.Version != 0 {
		v, err = opts.Version, renameToVersion(modelDir, staged, opts.Version)
	} else {
		v, err = renameToNextVersion(modelDir, staged)
	}
	if err != nil {
		undo()
		return Installed{}, fmt.Errorf("model %q: %w", model, err)
	}
	return Installed{Model: model, Version: v, Dir: filepath.Join(modelDir, strconv.FormatInt(v, 10)),
		ConfigCreated: created, Manifest: man}, nil
}

// copyPackage copies the package files of pkgDir into a new staging
// directory of model and returns it.
func copyPackage(repo, model, pkgDir string) (string, error) {
	tmp, err := NewStaging(repo, model)
	if err != nil {
		return "", err
	}
	if _, err := modelpkg.Copy(pkgDir, tmp); err != nil {
		os.RemoveAll(tmp)
		return "", fmt.Errorf("install %s: %w", pkgDir, err)
	}
	return tmp, nil
}

// ensureConfig writes the model's config.yaml (and labels.txt) when it
// has no configuration, or checks that cfg and labels fit the one it has;
// it reports whether it wrote one.
func ensureConfig(modelDir string, cfg *Config, labels []string) (bool, error) {
	existing, cfgPath, err := readModelConfig(modelDir)
	if err != nil {
		return false, err
	}
	if existing != nil {
		if err := configFits(existing, cfg, filepath.Base(cfgPath)); err != nil {
			return false, err
		}
		return false, sameLabels(modelDir, existing, labels)
	}
	if labels != nil {
		if err := atomicfile.WriteFile(filepath.Join(modelDir, "labels.txt"), []byte(strings.Join(labels, "\n")+"\n"), 0o644); err != nil {
			return false, err
		}
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return false, err
	}
	return true, atomicfile.WriteFile(filepath.Join(modelDir, "config.yaml"), b, 0o644)
}

// renameToVersion renames the directory staged to version v of modelDir,
// which must not exist yet, and syncs modelDir.
func renameToVersion(modelDir, staged string, v int64) error {
	if v < 1 {
		return core.Errorf(core.InvalidArgument, "version %d: versions are positive", v)
	}
	dst := filepath.Join(modelDir, strconv.FormatInt(v, 10))
	// rename(2) replaces an empty directory: refuse one that exists.
	if _, err := os.Lstat(dst); err == nil {
		return core.Errorf(core.AlreadyExists, "version %d exists already", v)
	}
	if err := os.Rename(staged, dst); err != nil {
		if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
			return core.Errorf(core.AlreadyExists, "version %d exists already", v)
		}
		return err
	}
	syncDir(modelDir)
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// renameToNextVersion renames the directory staged to the next free
// version directory of modelDir and syncs modelDir.
func renameToNextVersion(modelDir, staged string) (int64, error) {
	for {
		v, err := nextVersion(modelDir)
		if err != nil {
			return 0, err
		}
		err = os.Rename(staged, filepath.Join(modelDir, strconv.FormatInt(v, 10)))
		if err == nil {
			syncDir(modelDir)
			return v, nil
		}
		// Someone else took that version since nextVersion: try the next.
		if !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
			return 0, err
		}
	}
}

// PackageConfig is the serving configuration of a model package: its one
// input and one output, FP32, with the package's shapes less the batch
// dimension, dynamic batching (500 µs) and maxBatchSize (0: 64); the
// labels are returned when the output has one value per class label.
func PackageConfig(model string, man *modelpkg.Manifest, maxBatchSize int) (*Config, []string, error) {
	if len(man.Inputs) != 1 || len(man.Outputs) != 1 {
		return nil, nil, fmt.Errorf("package has %d inputs and %d outputs (want 1 and 1)", len(man.Inputs), len(man.Outputs))
	}
	in, out := man.Inputs[0], man.Outputs[0]
	if len(in.Shape) < 1 || len(out.Shape) < 1 || in.DType != "float32" || out.DType != "float32" {
		return nil, nil, fmt.Errorf("package input %v %s, output %v %s: want float32 with a batch dimension", in.Shape, in.DType, out.Shape, out.DType)
	}
	if maxBatchSize == 0 {
		maxBatchSize = DefaultInstallMaxBatchSize
	}
	cfg := &Config{
		Name:            model,
		Platform:        Platform,
		MaxBatchSize:    maxBatchSize,
		Inputs:          []TensorSpec{{Name: in.Name, DataType: FP32, Dims: slices.Clone(in.Shape[1:])}},
		Outputs:         []TensorSpec{{Name: out.Name, DataType: FP32, Dims: slices.Clone(out.Shape[1:])}},
		DynamicBatching: &DynamicBatching{MaxQueueDelayUS: 500},
		VersionPolicy:   VersionPolicy{Latest: 1},
	}
	if cols := in.Columns; len(cols) > 0 && int64(len(cols)) == in.Shape[len(in.Shape)-1] && hasCategories(cols) {
		// Raw records: one input per column, category strings as BYTES.
		cfg.Columns = true
		cfg.Inputs = make([]TensorSpec, len(cols))
		for i, c := range cols {
			cfg.Inputs[i] = TensorSpec{Name: c.Name, DataType: FP32, Dims: []int64{1}}
			if c.Categorical {
				cfg.Inputs[i].DataType, cfg.Inputs[i].Categories = Bytes, slices.Clone(c.Categories)
			}
		}
	}
	var labels []string
	if len(man.Labels) > 0 && len(out.Shape) == 2 && out.Shape[1] == int64(len(man.Labels)) {
		labels = man.Labels
		cfg.Outputs[0].Labels = "labels.txt"
	} else if len(man.Labels) == 2 && len(out.Shape) == 2 && out.Shape[1] == 1 {
		// A binary classifier: one logit or probability of labels[1].
		labels = man.Labels
		cfg.Outputs[0].Labels = "labels.txt"
		cfg.Outputs[0].Binary = "logit"
		if strings.HasPrefix(out.Meaning, "probabilit") {
			cfg.Outputs[0].Binary = "probability"
		}
	}
	if err := cfg.Validate(); err != nil {
		return nil, nil, fmt.Errorf("generated config: %w", err)
	}
	return cfg, labels, nil
}

// hasCategories reports whether a column is categorical.
func hasCategories(cols []data.FeatureInfo) bool {
	for _, c := range cols {
		if c.Categorical {
			return true
		}
	}
	return false
}

// readModelConfig returns the model's existing configuration (a Kiln file
// or config.pbtxt) and its file, or nil when it has none.
func readModelConfig(dir string) (*Config, string, error) {
	cfg, path, err := ReadConfig(dir)
	if errors.Is(err, ErrNoConfig) {
		return nil, "", nil
	}
	return cfg, path, err
}

// configFits checks that a package with configuration want can be a
// version of a model configured as have.
func configFits(have, want *Config, file string) error {
	describe := func(ts []TensorSpec) string {
		parts := make([]string, len(ts))
		for i, t := range ts {
			parts[i] = fmt.Sprintf("%s %s %v", t.Name, t.DataType, t.Dims)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	}
	same := func(a, b []TensorSpec) bool {
		return slices.EqualFunc(a, b, func(x, y TensorSpec) bool {
			return x.Name == y.Name && x.DataType == y.DataType && slices.Equal(x.Dims, y.Dims) &&
				slices.Equal(x.Categories, y.Categories)
		})
	}
	if !same(have.Inputs, want.Inputs) || !same(have.Outputs, want.Outputs) || (have.MaxBatchSize == 0) != (want.MaxBatchSize == 0) ||
		have.Columns != want.Columns {
		return fmt.Errorf("the package (inputs %s, outputs %s) does not fit the model's %s (inputs %s, outputs %s); install it under a new model name",
			describe(want.Inputs), describe(want.Outputs), file, describe(have.Inputs), describe(have.Outputs))
	}
	return nil
}

// sameLabels checks that the labels file the model's config names, if
// any, lists the package's class labels.
func sameLabels(dir string, cfg *Config, labels []string) error {
	for _, o := range cfg.Outputs {
		if o.Labels == "" || labels == nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(dir, o.Labels))
		if err != nil {
			return fmt.Errorf("output %q: labels: %w", o.Name, err)
		}
		var have []string
		for _, l := range strings.Split(string(raw), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				have = append(have, l)
			}
		}
		if !slices.Equal(have, labels) {
			return fmt.Errorf("output %q: the model's %s lists %v but the package's classes are %v; install it under a new model name", o.Name, o.Labels, have, labels)
		}
	}
	return nil
}

// nextVersion returns one more than the highest version directory.
func nextVersion(dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var top int64
	for _, e := range ents {
		v, err := strconv.ParseInt(e.Name(), 10, 64)
		if err == nil && v > top && strconv.FormatInt(v, 10) == e.Name() {
			top = v
		}
	}
	return top + 1, nil
}
