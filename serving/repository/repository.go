// Package repository reads a Kiln model repository: a directory holding one
// directory per model,
//
//	<repo>/<model>/config.yaml     (or config.yml, config.json, config.pbtxt)
//	<repo>/<model>/<version>/model.pt
//	<repo>/<model>/labels.txt      (optional, named by an output's "labels")
//
// where each <version> is a positive integer and model.pt a TorchScript
// archive. A config names the model's inputs and outputs with v2 datatypes
// ("FP32", "INT64", ...) and dims (-1 for a variable-size dimension), its
// batching, instance count and version policy:
//
//	name: mlp
//	platform: pytorch_torchscript
//	max_batch_size: 32
//	inputs:
//	  - {name: x, datatype: FP32, dims: [8]}
//	outputs:
//	  - {name: logits, datatype: FP32, dims: [3], labels: labels.txt, softmax: true}
//	dynamic_batching:
//	  max_queue_delay_us: 500
//	  preferred_batch_sizes: [8, 16]
//	  max_queue_size: 256
//	instance_count: 2
//	version_policy: {latest: 1}   # or {all: true} or {specific: [1, 3]}
//
// With max_batch_size > 0 every input and output has an implicit leading
// batch dimension that dims leave out, as in the v2 protocol.
//
// The same file may use Triton's spellings of these settings (input/output,
// data_type: TYPE_FP32, label_filename, max_queue_delay_microseconds,
// preferred_batch_size, default_queue_policy.max_queue_size,
// instance_group [{count, kind: KIND_CPU}], backend: pytorch,
// default_model_filename, version_policy {latest: {num_versions: 1}}); a
// setting given in both spellings is an error. A model directory may
// instead hold Triton's config.pbtxt (see ParseTritonConfig), so that a
// Triton repository of pytorch_libtorch models serves unchanged; a
// directory with both a config.pbtxt and a Kiln configuration file fails to
// load, naming both.
package repository

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Platform is the platform of a TorchScript model.
const Platform = "pytorch_torchscript"

// ConfigFiles are the names a model's configuration file may have, in the
// order they are looked for.
var ConfigFiles = []string{"config.yaml", "config.yml", "config.json"}

// DefaultModelFile is the model file name inside a version directory.
const DefaultModelFile = "model.pt"

// ErrNotFound is wrapped by errors about a model the repository lacks.
var ErrNotFound = errors.New("not found")

// TensorSpec declares one input or output of a model in its configuration:
// the name, element type and shape that requests and responses carry (Triton
// calls these ModelInput and ModelOutput). It holds no values. Inputs and
// outputs share the type; Labels and Softmax are valid on outputs only.
type TensorSpec struct {
	// Name is the tensor's name in requests and responses.
	Name string `json:"name" yaml:"name"`
	// DataType is the v2 element type, e.g. "FP32".
	DataType DataType `json:"datatype" yaml:"datatype"`
	// Dims is the shape without the batch dimension; -1 is variable.
	Dims []int64 `json:"dims" yaml:"dims"`
	// Labels, on an output, names a file in the model's directory with one
	// class label per line, used by the classification extension.
	Labels string `json:"labels,omitempty" yaml:"labels,omitempty"`
	// Softmax, on an FP32 or FP64 output, replaces the model's values by
	// their softmax along the last dimension before they are returned (and
	// before classification ranks them).
	Softmax bool `json:"softmax,omitempty" yaml:"softmax,omitempty"`
	// Categories, on a BYTES input of a Columns config, is the column's
	// vocabulary in index order.
	Categories []string `json:"categories,omitempty" yaml:"categories,omitempty"`
	// index maps a category to its index (built by Config.Validate, so
	// that requests read it without locking).
	index map[string]int
	// Binary, on an output of one value per batch element with two
	// labels, says what the value is: "logit" (of labels[1]: class 1 when
	// > 0) or "probability" (of labels[1]: class 1 when > 0.5), so that
	// classification answers with the predicted label and its
	// probability. Kiln's binary classifiers are installed with it.
	Binary string `json:"binary,omitempty" yaml:"binary,omitempty"`
}

// DynamicBatching configures the dynamic batcher.
type DynamicBatching struct {
	// MaxQueueDelayUS is the longest a request waits for others to join its
	// batch, in microseconds.
	MaxQueueDelayUS int64 `json:"max_queue_delay_us" yaml:"max_queue_delay_us"`
	// PreferredBatchSizes are batch sizes that are dispatched as soon as
	// they can be formed.
	PreferredBatchSizes []int `json:"preferred_batch_sizes,omitempty" yaml:"preferred_batch_sizes,omitempty"`
	// MaxQueueSize bounds the queued requests; 0 means unbounded. A request
	// arriving at a full queue is refused.
	MaxQueueSize int `json:"max_queue_size,omitempty" yaml:"max_queue_size,omitempty"`
}

// VersionPolicy selects the versions served. At most one field is set;
// none means the latest version.
type VersionPolicy struct {
	// Latest serves the Latest highest versions.
	Latest int `json:"latest,omitempty" yaml:"latest,omitempty"`
	// All serves every version.
	All bool `json:"all,omitempty" yaml:"all,omitempty"`
	// Specific serves the listed versions.
	Specific []int64 `json:"specific,omitempty" yaml:"specific,omitempty"`
}

// Config is a model's configuration file.
type Config struct {
	// Name is the model's name; it must equal its directory's name (empty
	// means that name).
	Name string `json:"name" yaml:"name"`
	// Platform must be "pytorch_torchscript" (empty means that).
	Platform string `json:"platform" yaml:"platform"`
	// MaxBatchSize is the largest batch along dimension 0; 0 means the
	// model does not batch and dims are whole shapes.
	MaxBatchSize int `json:"max_batch_size" yaml:"max_batch_size"`
	// Inputs are the forward method's arguments, in order (with Columns,
	// the columns of a raw record).
	Inputs []TensorSpec `json:"inputs" yaml:"inputs"`
	// Columns, for a Kiln package trained on a table, makes the inputs
	// one per column of the raw record (dims [1]): FP32 numbers (NaN for
	// a null) and BYTES category strings, mapped through the input's
	// Categories (the stored vocabulary) to their index; an unknown or
	// empty string maps to NaN, the model's "unknown" encoding. The
	// server assembles them into the single float32 [batch, inputs]
	// tensor the package's forward takes, whose preprocessing then
	// imputes, scales and one-hot encodes. It needs max_batch_size > 0.
	Columns bool `json:"columns,omitempty" yaml:"columns,omitempty"`
	// Outputs are the tensors forward returns (tuples flattened), in order.
	Outputs []TensorSpec `json:"outputs" yaml:"outputs"`
	// DynamicBatching, when set, merges requests into batches; it needs
	// MaxBatchSize > 0.
	DynamicBatching *DynamicBatching `json:"dynamic_batching,omitempty" yaml:"dynamic_batching,omitempty"`
	// InstanceCount is the number of executions that run at once (0: 1).
	InstanceCount int `json:"instance_count,omitempty" yaml:"instance_count,omitempty"`
	// Device places the model: "cpu" (or empty), "cuda" or "cuda:N", as
	// PyTorch names devices. Triton's instance_group with kind KIND_GPU
	// and gpus [N] sets it to "cuda:N". A GPU that the linked libtorch or
	// the machine lacks fails validation with the reason, so the model is
	// not ready and the index says why.
	Device string `json:"device,omitempty" yaml:"device,omitempty"`
	// VersionPolicy selects the versions served.
	VersionPolicy VersionPolicy `json:"version_policy" yaml:"version_policy"`
	// ModelFile is the model's file name in each version directory
	// (empty: model.pt).
	ModelFile string `json:"model_file,omitempty" yaml:"model_file,omitempty"`
	// Warmup, when true (the default), runs one forward pass on zeros before
	// a version takes traffic, and checks its outputs against Outputs.
	Warmup *bool `json:"warmup,omitempty" yaml:"warmup,omitempty"`
	// OptimizeForInference, when true (the default), serves each CPU
	// version frozen and optimized for inference, as PyTorch's
	// torch.jit.optimize_for_inference(torch.jit.freeze(model)) does
	// (core.Module.OptimizeForInference): convolutions on oneDNN with
	// weights reordered once, batch norms folded, parameters constant.
	// Answers may then differ from the file's own forward by float
	// rounding; false serves the file as it is. A model the passes refuse
	// is served as it is, with a warning in the log. CUDA models are
	// never optimized.
	OptimizeForInference *bool `json:"optimize_for_inference,omitempty" yaml:"optimize_for_inference,omitempty"`
	// Rollout is the model's rollout policy as written in its config's
	// "rollout" block (YAML or JSON text; package serving/rollout reads it:
	// steps, window, thresholds, shadow share, sticky key), nil when the
	// config has none. Its fields override the server's default policy
	// and are overridden by a rollout's start request.
	Rollout []byte `json:"rollout,omitempty" yaml:"-"`
}

// DeviceName returns the device the model runs on: Device, or "cpu".
func (c *Config) DeviceName() string {
	if c.Device == "" {
		return "cpu"
	}
	return c.Device
}

// Instances returns the number of concurrent executions, at least 1.
func (c *Config) Instances() int { return max(c.InstanceCount, 1) }

// WarmupEnabled reports whether versions are warmed up before serving.
func (c *Config) WarmupEnabled() bool { return c.Warmup == nil || *c.Warmup }

// OptimizeForInferenceEnabled reports whether CPU versions are served
// frozen and optimized for inference (OptimizeForInference, default true).
func (c *Config) OptimizeForInferenceEnabled() bool {
	return c.OptimizeForInference == nil || *c.OptimizeForInference
}

// Model is a model's directory in a repository, read and validated.
type Model struct {
	// Name is the model's name.
	Name string
	// Dir is the model's directory.
	Dir string
	// Config is its validated configuration.
	Config *Config
	// Labels holds, for each output with a labels file, its labels.
	Labels map[string][]string
	// Versions lists every version directory, ascending.
	Versions []int64
}

// Selected returns the versions the version policy serves, ascending.
func (m *Model) Selected() []int64 {
	p := m.Config.VersionPolicy
	switch {
	case p.All:
		return slices.Clone(m.Versions)
	case len(p.Specific) > 0:
		var out []int64
		for _, v := range m.Versions {
			if slices.Contains(p.Specific, v) {
				out = append(out, v)
			}
		}
		return out
	}
	n := max(p.Latest, 1)
	if n > len(m.Versions) {
		n = len(m.Versions)
	}
	return slices.Clone(m.Versions[len(m.Versions)-n:])
}

// ModelPath returns the model file of version v.
func (m *Model) ModelPath(v int64) string {
	f := m.Config.ModelFile
	if f == "" {
		f = DefaultModelFile
	}
	return filepath.Join(m.Dir, strconv.FormatInt(v, 10), f)
}

// Repository is a model repository directory.
type Repository struct {
	root   string
	remote RemoteStatus // nil for a plain directory
}

// RemoteStatus reports what a remote source that keeps the repository's
// directory (s3repo.Mirror) could not bring into it: a problem of the
// whole model (or repository), and by version why that version is not in
// place. Both are empty when everything arrived.
type RemoteStatus interface {
	Problem(model string) (wide string, versions map[int64]string)
}

// SetRemote makes the repository report s's problems (Problem) and count
// them in Fingerprint, so that polling notices when one appears or goes.
// Call it before the repository is used.
func (r *Repository) SetRemote(s RemoteStatus) { r.remote = s }

// Problem returns the remote source's problems with model name (see
// RemoteStatus); none for a plain directory.
func (r *Repository) Problem(name string) (string, map[int64]string) {
	if r.remote == nil {
		return "", nil
	}
	return r.remote.Problem(name)
}

// Open opens the repository at root, which must be a directory.
func Open(root string) (*Repository, error) {
	st, err := os.Stat(root)
	if err != nil {
		return nil, fmt.Errorf("model repository: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("model repository %s: not a directory", root)
	}
	return &Repository{root: root}, nil
}

// Root returns the repository's directory.
func (r *Repository) Root() string { return r.root }

// Names lists the models: the directories under the root that hold a
// configuration file (a Kiln one or config.pbtxt), sorted.
func (r *Repository) Names() ([]string, error) {
	ents, err := os.ReadDir(r.root)
	if err != nil {
		return nil, fmt.Errorf("model repository: %w", err)
	}
	var names []string
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if _, err := findConfig(filepath.Join(r.root, e.Name())); err == nil || errors.Is(err, errBothConfigs) {
			names = append(names, e.Name()) // with two configurations: listed, fails to load
		}
	}
	return names, nil
}

var validName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.\-]*$`)

// Model reads and validates model name's directory.
func (r *Repository) Model(name string) (*Model, error) {
	if !validName.MatchString(name) {
		return nil, fmt.Errorf("model %q: invalid model name: %w", name, ErrNotFound)
	}
	dir := filepath.Join(r.root, name)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("model %q: no such model in repository %s: %w", name, r.root, ErrNotFound)
	}
	cfg, cfgPath, err := ReadConfig(dir)
	if err != nil {
		return nil, fmt.Errorf("model %q: %w", name, err)
	}
	if cfg.Name == "" {
		cfg.Name = name
	}
	if cfg.Name != name {
		return nil, fmt.Errorf("model %q: %s: name %q differs from the directory's name", name, filepath.Base(cfgPath), cfg.Name)
	}
	m := &Model{Name: name, Dir: dir, Config: cfg, Labels: map[string][]string{}}
	for _, o := range cfg.Outputs {
		if o.Labels == "" {
			continue
		}
		labels, err := readLabels(filepath.Join(dir, o.Labels))
		if err != nil {
			return nil, fmt.Errorf("model %q: output %q: labels: %w", name, o.Name, err)
		}
		m.Labels[o.Name] = labels
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("model %q: %w", name, err)
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		v, err := strconv.ParseInt(e.Name(), 10, 64)
		if err != nil || v < 1 || strconv.FormatInt(v, 10) != e.Name() {
			continue // not a version directory
		}
		m.Versions = append(m.Versions, v)
	}
	slices.Sort(m.Versions)
	if len(m.Versions) == 0 {
		return nil, fmt.Errorf("model %q: no version directories (1/, 2/, ...) in %s", name, dir)
	}
	if len(m.Selected()) == 0 {
		return nil, fmt.Errorf("model %q: version policy %s selects none of the versions %v", name, describePolicy(cfg.VersionPolicy), m.Versions)
	}
	return m, nil
}

// Fingerprint summarizes model name's directory: the name, size and
// modification time of every file in it and in its version directories. It
// changes when a file is added, removed or rewritten; polling compares
// fingerprints to find the models to reload.
func (r *Repository) Fingerprint(name string) (string, error) {
	if !validName.MatchString(name) {
		return "", fmt.Errorf("model %q: invalid model name: %w", name, ErrNotFound)
	}
	dir := filepath.Join(r.root, name)
	h := sha256.New()
	var walk func(rel string, depth int) error
	walk = func(rel string, depth int) error {
		ents, err := os.ReadDir(filepath.Join(dir, rel))
		if err != nil {
			return err
		}
		for _, e := range ents {
			p := filepath.Join(rel, e.Name())
			info, err := os.Stat(filepath.Join(dir, p)) // follows links
			if err != nil {
				fmt.Fprintf(h, "%s\x00missing\n", p)
				continue
			}
			if info.IsDir() {
				if depth == 0 {
					fmt.Fprintf(h, "%s/\n", p)
					if err := walk(p, 1); err != nil {
						return err
					}
				}
				continue
			}
			fmt.Fprintf(h, "%s\x00%d\x00%d\n", p, info.Size(), info.ModTime().UnixNano())
		}
		return nil
	}
	if err := walk("", 0); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("model %q: %w", name, ErrNotFound)
		}
		return "", fmt.Errorf("model %q: %w", name, err)
	}
	if wide, versions := r.Problem(name); wide != "" || len(versions) > 0 {
		fmt.Fprintf(h, "remote\x00%s\n", wide)
		for _, v := range slices.Sorted(maps.Keys(versions)) {
			fmt.Fprintf(h, "%d\x00%s\n", v, versions[v])
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func describePolicy(p VersionPolicy) string {
	switch {
	case p.All:
		return "all"
	case len(p.Specific) > 0:
		return fmt.Sprintf("specific %v", p.Specific)
	}
	return fmt.Sprintf("latest %d", max(p.Latest, 1))
}

// ReadConfig reads and validates the configuration file of model directory
// dir: one of ConfigFiles or config.pbtxt (see findConfigs). It returns the
// configuration and the file's path. Errors name the file; an error wraps
// ErrNoConfig when dir holds no configuration file.
func ReadConfig(dir string) (*Config, string, error) {
	path, err := findConfig(dir)
	if err != nil {
		return nil, "", err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, "", err
	}
	var cfg *Config
	if filepath.Base(path) == TritonConfigFile {
		cfg, err = ParseTritonConfig(raw)
	} else {
		cfg, err = ParseConfig(raw, filepath.Ext(path) == ".json")
	}
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return cfg, path, nil
}

// findConfig returns the path of the configuration file in dir (see
// findConfigs).
func findConfig(dir string) (string, error) {
	f, err := findConfigs(dir, func(name string) bool {
		st, err := os.Stat(filepath.Join(dir, name))
		return err == nil && !st.IsDir()
	})
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, f), nil
}

func readLabels(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var labels []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		labels = append(labels, strings.TrimSpace(sc.Text()))
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for len(labels) > 0 && labels[len(labels)-1] == "" {
		labels = labels[:len(labels)-1]
	}
	if len(labels) == 0 {
		return nil, fmt.Errorf("%s holds no labels", path)
	}
	return labels, nil
}
