package repository

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	yaml "go.yaml.in/yaml/v3"

	"github.com/kilnml/kiln/core"
)

// ParseConfig decodes a configuration (YAML, or JSON when isJSON), rejecting
// unknown fields, and validates it. Besides Kiln's keys it takes Triton's
// spellings of the same settings (see configFile); giving both spellings of
// one setting is an error, as is a Triton setting Kiln cannot honour.
func ParseConfig(raw []byte, isJSON bool) (*Config, error) {
	var f configFile
	if isJSON {
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			return nil, fmt.Errorf("invalid JSON: %w", err)
		}
		if dec.More() {
			return nil, errors.New("invalid JSON: data after the configuration object")
		}
	} else {
		dec := yaml.NewDecoder(bytes.NewReader(raw))
		dec.KnownFields(true)
		if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("invalid YAML: %w", err)
		}
	}
	c, err := f.config()
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// configFile is a configuration file as written: Kiln's keys and, next to
// each, Triton's key for the same setting (model_config.proto's field
// names). config turns it into a Config.
type configFile struct {
	Name     string `json:"name" yaml:"name"`
	Platform string `json:"platform" yaml:"platform"`
	// Backend is Triton's backend name; "pytorch" means TorchScript.
	Backend      string       `json:"backend" yaml:"backend"`
	MaxBatchSize int          `json:"max_batch_size" yaml:"max_batch_size"`
	Inputs       []tensorFile `json:"inputs" yaml:"inputs"`
	Input        []tensorFile `json:"input" yaml:"input"` // Triton
	Outputs      []tensorFile `json:"outputs" yaml:"outputs"`
	Output       []tensorFile `json:"output" yaml:"output"` // Triton

	DynamicBatching *dynamicBatchingFile `json:"dynamic_batching" yaml:"dynamic_batching"`
	InstanceCount   int                  `json:"instance_count" yaml:"instance_count"`
	InstanceGroup   []instanceGroupFile  `json:"instance_group" yaml:"instance_group"` // Triton
	Device          string               `json:"device" yaml:"device"`
	VersionPolicy   versionPolicyFile    `json:"version_policy" yaml:"version_policy"`
	ModelFile       string               `json:"model_file" yaml:"model_file"`
	// DefaultModelFilename is Triton's model_file.
	DefaultModelFilename string `json:"default_model_filename" yaml:"default_model_filename"`
	Warmup               *bool  `json:"warmup" yaml:"warmup"`
	OptimizeForInference *bool  `json:"optimize_for_inference" yaml:"optimize_for_inference"`
	Columns              bool   `json:"columns" yaml:"columns"`
	// Rollout is Kiln's rollout policy of the model (see Config.Rollout).
	Rollout rawBlock `json:"rollout" yaml:"rollout"`
}

// rawBlock keeps a block of a configuration as written (YAML text, or
// JSON, which is YAML) for the package that reads it.
type rawBlock []byte

// UnmarshalYAML keeps the block re-encoded as YAML text.
func (r *rawBlock) UnmarshalYAML(n *yaml.Node) error {
	b, err := yaml.Marshal(n)
	if err != nil {
		return err
	}
	*r = b
	return nil
}

// UnmarshalJSON keeps the block's JSON.
func (r *rawBlock) UnmarshalJSON(b []byte) error {
	*r = append(rawBlock(nil), b...)
	return nil
}

// tensorFile is one input or output as written.
type tensorFile struct {
	Name     string   `json:"name" yaml:"name"`
	DataType DataType `json:"datatype" yaml:"datatype"`
	// TritonDataType is Triton's data_type: "TYPE_FP32", ...
	TritonDataType string       `json:"data_type" yaml:"data_type"`
	Dims           []int64      `json:"dims" yaml:"dims"`
	Reshape        *reshapeFile `json:"reshape" yaml:"reshape"` // Triton
	Labels         string       `json:"labels" yaml:"labels"`
	// LabelFilename is Triton's labels.
	LabelFilename string   `json:"label_filename" yaml:"label_filename"`
	Softmax       bool     `json:"softmax" yaml:"softmax"`
	Binary        string   `json:"binary" yaml:"binary"`
	Categories    []string `json:"categories" yaml:"categories"`
}

// reshapeFile is Triton's ModelTensorReshape.
type reshapeFile struct {
	Shape []int64 `json:"shape" yaml:"shape"`
}

// dynamicBatchingFile is dynamic_batching as written.
type dynamicBatchingFile struct {
	MaxQueueDelayUS           *int64 `json:"max_queue_delay_us" yaml:"max_queue_delay_us"`
	MaxQueueDelayMicroseconds *int64 `json:"max_queue_delay_microseconds" yaml:"max_queue_delay_microseconds"` // Triton
	PreferredBatchSizes       []int  `json:"preferred_batch_sizes" yaml:"preferred_batch_sizes"`
	PreferredBatchSize        []int  `json:"preferred_batch_size" yaml:"preferred_batch_size"` // Triton
	MaxQueueSize              *int   `json:"max_queue_size" yaml:"max_queue_size"`
	// DefaultQueuePolicy is Triton's home of max_queue_size.
	DefaultQueuePolicy *queuePolicyFile `json:"default_queue_policy" yaml:"default_queue_policy"`
}

// queuePolicyFile is the part of Triton's ModelQueuePolicy Kiln honours.
type queuePolicyFile struct {
	MaxQueueSize int `json:"max_queue_size" yaml:"max_queue_size"`
}

// instanceGroupFile is Triton's ModelInstanceGroup.
type instanceGroupFile struct {
	Name  string  `json:"name" yaml:"name"`
	Count *int    `json:"count" yaml:"count"`
	Kind  string  `json:"kind" yaml:"kind"`
	GPUs  []int32 `json:"gpus" yaml:"gpus"`
}

// versionPolicyFile is version_policy as written: each key takes Kiln's
// form or Triton's (latest: 2 or latest: {num_versions: 2}; all: true or
// all: {}; specific: [1, 3] or specific: {versions: [1, 3]}).
type versionPolicyFile struct {
	Latest   latestFile   `json:"latest" yaml:"latest"`
	All      allFile      `json:"all" yaml:"all"`
	Specific specificFile `json:"specific" yaml:"specific"`
}

type (
	latestFile   int
	allFile      bool
	specificFile []int64
)

// UnmarshalYAML takes 2 or {num_versions: 2}.
func (l *latestFile) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.MappingNode {
		return n.Decode((*int)(l))
	}
	var v struct {
		NumVersions int `yaml:"num_versions"`
	}
	if err := decodeMapping(n, "version_policy.latest", &v, "num_versions"); err != nil {
		return err
	}
	return l.setNumVersions(v.NumVersions)
}

// UnmarshalJSON takes 2 or {"num_versions": 2}.
func (l *latestFile) UnmarshalJSON(b []byte) error {
	if !isJSONObject(b) {
		return json.Unmarshal(b, (*int)(l))
	}
	var v struct {
		NumVersions int `json:"num_versions"`
	}
	if err := strictJSON(b, &v); err != nil {
		return err
	}
	return l.setNumVersions(v.NumVersions)
}

// setNumVersions takes Triton's num_versions, which must be ≥ 1.
func (l *latestFile) setNumVersions(n int) error {
	if n < 1 {
		return fmt.Errorf("version_policy.latest.num_versions is %d (want ≥ 1)", n)
	}
	*l = latestFile(n)
	return nil
}

// UnmarshalYAML takes true or {}.
func (a *allFile) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.MappingNode {
		return n.Decode((*bool)(a))
	}
	if err := decodeMapping(n, "version_policy.all", &struct{}{}); err != nil {
		return err
	}
	*a = true
	return nil
}

// UnmarshalJSON takes true or {}.
func (a *allFile) UnmarshalJSON(b []byte) error {
	if !isJSONObject(b) {
		return json.Unmarshal(b, (*bool)(a))
	}
	if err := strictJSON(b, &struct{}{}); err != nil {
		return err
	}
	*a = true
	return nil
}

// UnmarshalYAML takes [1, 3] or {versions: [1, 3]}.
func (s *specificFile) UnmarshalYAML(n *yaml.Node) error {
	var v struct {
		Versions []int64 `yaml:"versions"`
	}
	if n.Kind != yaml.MappingNode {
		if err := n.Decode(&v.Versions); err != nil {
			return err
		}
	} else if err := decodeMapping(n, "version_policy.specific", &v, "versions"); err != nil {
		return err
	}
	*s = append(specificFile{}, v.Versions...) // set, even when empty
	return nil
}

// UnmarshalJSON takes [1, 3] or {"versions": [1, 3]}.
func (s *specificFile) UnmarshalJSON(b []byte) error {
	if bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
		return nil
	}
	var v struct {
		Versions []int64 `json:"versions"`
	}
	if !isJSONObject(b) {
		if err := json.Unmarshal(b, &v.Versions); err != nil {
			return err
		}
	} else if err := strictJSON(b, &v); err != nil {
		return err
	}
	*s = append(specificFile{}, v.Versions...)
	return nil
}

// decodeMapping decodes mapping n into v after checking that its keys are
// among known (yaml.Node.Decode does not reject unknown fields).
func decodeMapping(n *yaml.Node, where string, v any, known ...string) error {
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i].Value
		if !containsString(known, k) {
			want := "no fields"
			if len(known) > 0 {
				want = strings.Join(known, ", ")
			}
			return fmt.Errorf("line %d: %s: unknown field %q (want %s)", n.Content[i].Line, where, k, want)
		}
	}
	return n.Decode(v)
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func isJSONObject(b []byte) bool {
	b = bytes.TrimSpace(b)
	return len(b) > 0 && b[0] == '{'
}

func strictJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// oneOf returns whichever of kiln and triton is set (non-zero), or an
// error when both are.
func oneOf[T comparable](kilnKey string, kiln T, tritonKey string, triton T) (T, error) {
	var zero T
	if kiln != zero && triton != zero {
		return zero, fmt.Errorf("give %s or %s (Triton's spelling), not both", kilnKey, tritonKey)
	}
	if kiln != zero {
		return kiln, nil
	}
	return triton, nil
}

// config merges the two spellings into a Config (not yet validated).
func (f *configFile) config() (*Config, error) {
	c := &Config{Name: f.Name, MaxBatchSize: f.MaxBatchSize, InstanceCount: f.InstanceCount, Warmup: f.Warmup, Device: f.Device, Columns: f.Columns,
		OptimizeForInference: f.OptimizeForInference,
		Rollout:              []byte(f.Rollout)}
	var err error
	if c.Platform, err = platformOf(f.Platform, f.Backend); err != nil {
		return nil, err
	}
	if c.ModelFile, err = oneOf("model_file", f.ModelFile, "default_model_filename", f.DefaultModelFilename); err != nil {
		return nil, err
	}
	if c.Inputs, err = tensorSpecs("input", "inputs", f.Inputs, f.Input); err != nil {
		return nil, err
	}
	if c.Outputs, err = tensorSpecs("output", "outputs", f.Outputs, f.Output); err != nil {
		return nil, err
	}
	if c.DynamicBatching, err = f.DynamicBatching.config(); err != nil {
		return nil, err
	}
	if len(f.InstanceGroup) > 0 {
		if f.InstanceCount != 0 {
			return nil, errors.New("give instance_count or instance_group (Triton's spelling), not both")
		}
		var device string
		if c.InstanceCount, device, err = instanceGroups(f.InstanceGroup); err != nil {
			return nil, err
		}
		if device != "" {
			if f.Device != "" && f.Device != device {
				return nil, fmt.Errorf("device %q and instance_group (Triton's spelling, %s) disagree", f.Device, device)
			}
			c.Device = device
		}
	}
	p := f.VersionPolicy
	c.VersionPolicy = VersionPolicy{Latest: int(p.Latest), All: bool(p.All), Specific: []int64(p.Specific)}
	return c, nil
}

// platformOf reconciles platform with Triton's backend: "pytorch" is the
// backend of TorchScript models, and "kiln" the one Kiln reports in its
// model configuration; any other backend is refused.
func platformOf(platform, backend string) (string, error) {
	switch backend {
	case "":
		return platform, nil
	case "pytorch", "kiln":
		if platform != "" && platform != Platform && platform != "pytorch_libtorch" {
			return "", fmt.Errorf("backend %q does not run platform %q", backend, platform)
		}
		return Platform, nil
	}
	return "", fmt.Errorf("backend %q is not supported (want \"pytorch\": Kiln serves TorchScript models)", backend)
}

// tensorSpecs merges a list given under Kiln's key and Triton's.
func tensorSpecs(kind, kilnKey string, kiln, triton []tensorFile) ([]TensorSpec, error) {
	if len(kiln) > 0 && len(triton) > 0 {
		return nil, fmt.Errorf("give %s or %s (Triton's spelling), not both", kilnKey, kind)
	}
	list := kiln
	if len(triton) > 0 {
		list = triton
	}
	var out []TensorSpec
	for i, t := range list {
		s, err := t.spec()
		if err != nil {
			name := t.Name
			if name == "" {
				name = fmt.Sprintf("#%d", i)
			}
			return nil, fmt.Errorf("%s %q: %w", kind, name, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// spec merges one tensor's spellings.
func (t tensorFile) spec() (TensorSpec, error) {
	s := TensorSpec{Name: t.Name, DataType: t.DataType, Dims: t.Dims, Softmax: t.Softmax, Binary: t.Binary, Categories: t.Categories}
	if t.TritonDataType != "" {
		if t.DataType != "" {
			return s, errors.New("give datatype or data_type (Triton's spelling), not both")
		}
		d, err := TritonDataType(t.TritonDataType)
		if err != nil {
			return s, err
		}
		s.DataType = d
	}
	var err error
	if s.Labels, err = oneOf("labels", t.Labels, "label_filename", t.LabelFilename); err != nil {
		return s, err
	}
	if t.Reshape != nil {
		if !sameDims(t.Reshape.Shape, t.Dims) {
			return s, fmt.Errorf("reshape %v differs from dims %v: Kiln passes tensors to the model in the shape clients send (give the model that shape, or drop reshape)", t.Reshape.Shape, t.Dims)
		}
	}
	return s, nil
}

func sameDims(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TritonDataType converts Triton's model-configuration data type
// ("TYPE_FP32", "TYPE_STRING", ...) to the v2 datatype ("FP32", "BYTES").
func TritonDataType(s string) (DataType, error) {
	name, ok := strings.CutPrefix(s, "TYPE_")
	if !ok || name == "INVALID" {
		return "", fmt.Errorf("unknown data_type %q (want TYPE_FP32, TYPE_INT64, ...)", s)
	}
	if name == "STRING" {
		return Bytes, nil
	}
	d := DataType(name)
	if !d.Known() && d != Bytes {
		return "", fmt.Errorf("unknown data_type %q (want TYPE_FP32, TYPE_INT64, ...)", s)
	}
	return d, nil
}

// config merges dynamic_batching's spellings; nil stays nil.
func (d *dynamicBatchingFile) config() (*DynamicBatching, error) {
	if d == nil {
		return nil, nil
	}
	b := &DynamicBatching{}
	delay, err := oneOf("dynamic_batching.max_queue_delay_us", d.MaxQueueDelayUS,
		"max_queue_delay_microseconds", d.MaxQueueDelayMicroseconds)
	if err != nil {
		return nil, err
	}
	if delay != nil {
		b.MaxQueueDelayUS = *delay
	}
	if len(d.PreferredBatchSizes) > 0 && len(d.PreferredBatchSize) > 0 {
		return nil, errors.New("give dynamic_batching.preferred_batch_sizes or preferred_batch_size (Triton's spelling), not both")
	}
	b.PreferredBatchSizes = append(d.PreferredBatchSizes, d.PreferredBatchSize...)
	if d.DefaultQueuePolicy != nil {
		if d.MaxQueueSize != nil {
			return nil, errors.New("give dynamic_batching.max_queue_size or default_queue_policy.max_queue_size (Triton's spelling), not both")
		}
		b.MaxQueueSize = d.DefaultQueuePolicy.MaxQueueSize
	} else if d.MaxQueueSize != nil {
		b.MaxQueueSize = *d.MaxQueueSize
	}
	return b, nil
}

// instanceGroups reads Triton's instance groups: the instances they sum
// to (count each, 1 when count is absent) and the device they place the
// model on. KIND_CPU and KIND_AUTO are the CPU (""); KIND_GPU is "cuda:N"
// for gpus [N] and "cuda:0" without gpus (Triton would place a copy on
// every GPU; Kiln places a model version on one device, so a group may
// name one GPU, and every group the same device). KIND_MODEL is refused.
func instanceGroups(groups []instanceGroupFile) (count int, device string, err error) {
	for i, g := range groups {
		var d string
		switch g.Kind {
		case "", "KIND_AUTO", "KIND_CPU":
			if len(g.GPUs) > 0 {
				return 0, "", fmt.Errorf("instance_group[%d]: gpus %v with kind %s (use KIND_GPU to place the model on a GPU)", i, g.GPUs, cmp.Or(g.Kind, "KIND_AUTO"))
			}
		case "KIND_GPU":
			switch len(g.GPUs) {
			case 0:
				d = "cuda:0"
			case 1:
				if g.GPUs[0] < 0 {
					return 0, "", fmt.Errorf("instance_group[%d]: gpus [%d]: a GPU index is ≥ 0", i, g.GPUs[0])
				}
				d = fmt.Sprintf("cuda:%d", g.GPUs[0])
			default:
				return 0, "", fmt.Errorf("instance_group[%d]: gpus %v: Kiln places a model version on one device; list one GPU", i, g.GPUs)
			}
		case "KIND_MODEL":
			return 0, "", fmt.Errorf("instance_group[%d]: kind KIND_MODEL is not supported (use KIND_CPU or KIND_GPU)", i)
		default:
			return 0, "", fmt.Errorf("instance_group[%d]: unknown kind %q (want KIND_CPU or KIND_GPU)", i, g.Kind)
		}
		if i > 0 && d != device {
			return 0, "", fmt.Errorf("instance_group[%d]: places the model on %s, instance_group[0] on %s: Kiln places a model version on one device", i, cmp.Or(d, "cpu"), cmp.Or(device, "cpu"))
		}
		device = d
		n := 1
		if g.Count != nil {
			n = *g.Count
		}
		if n < 1 {
			return 0, "", fmt.Errorf("instance_group[%d]: count is %d (want ≥ 1)", i, n)
		}
		count += n
	}
	return count, device, nil
}

// Validate checks the configuration and fills in defaults (platform). It
// runs its stages in order and returns the first error.
func (c *Config) Validate() error {
	for _, stage := range []func() error{
		c.validateName,
		c.validatePlatform,
		c.validateMaxBatchSize,
		c.validateTensorSpecs,
		c.validateDynamicBatching,
		c.validateInstanceCount,
		c.validateDevice,
		c.validateVersionPolicy,
		c.validateModelFile,
	} {
		if err := stage(); err != nil {
			return err
		}
	}
	return nil
}

// validateName checks the optional model name.
func (c *Config) validateName() error {
	if c.Name != "" && !validName.MatchString(c.Name) {
		return fmt.Errorf("invalid model name %q", c.Name)
	}
	return nil
}

// validatePlatform accepts TorchScript's two names (and none), and sets
// Platform to Kiln's.
func (c *Config) validatePlatform() error {
	switch c.Platform {
	case "", Platform, "pytorch_libtorch":
		c.Platform = Platform
		return nil
	}
	return fmt.Errorf("platform %q is not supported (want %q)", c.Platform, Platform)
}

func (c *Config) validateMaxBatchSize() error {
	if c.MaxBatchSize < 0 {
		return fmt.Errorf("max_batch_size is negative (%d)", c.MaxBatchSize)
	}
	return nil
}

// validateTensorSpecs checks that there are inputs and outputs, then each
// of them in order.
func (c *Config) validateTensorSpecs() error {
	if len(c.Inputs) == 0 {
		return errors.New("no inputs")
	}
	if len(c.Outputs) == 0 {
		return errors.New("no outputs")
	}
	seen := map[string]bool{}
	for i, t := range c.Inputs {
		if c.Columns {
			if err := c.validateColumn(t, seen); err != nil {
				return err
			}
			if t.DataType == Bytes {
				c.Inputs[i].index = categoryIndex(t.Categories)
			}
			continue
		}
		if len(t.Categories) > 0 {
			return fmt.Errorf("input %q: categories belong to the inputs of a columns config", t.Name)
		}
		if err := c.validateTensorSpec("input", t, seen); err != nil {
			return err
		}
	}
	for _, t := range c.Outputs {
		if err := c.validateTensorSpec("output", t, seen); err != nil {
			return err
		}
	}
	return nil
}

// validateTensorSpec checks one input or output (kind); seen holds the
// kind/name pairs already declared.
func (c *Config) validateTensorSpec(kind string, t TensorSpec, seen map[string]bool) error {
	if err := validateTensorName(kind, t, seen); err != nil {
		return err
	}
	if err := validateDataType(kind, t); err != nil {
		return err
	}
	if err := c.validateDims(kind, t); err != nil {
		return err
	}
	if err := c.validateSoftmax(kind, t); err != nil {
		return err
	}
	if err := validateBinary(kind, t); err != nil {
		return err
	}
	return validateLabels(kind, t)
}

// validateColumn checks one input of a Columns config: a named FP32 or
// BYTES (with categories) column of dims [1], in a batching model.
func (c *Config) validateColumn(t TensorSpec, seen map[string]bool) error {
	if err := validateTensorName("input", t, seen); err != nil {
		return err
	}
	if c.MaxBatchSize <= 0 {
		return fmt.Errorf("columns needs max_batch_size > 0 (a batch of rows)")
	}
	if len(t.Dims) != 1 || t.Dims[0] != 1 {
		return fmt.Errorf("input %q: a column has dims [1], not %v", t.Name, t.Dims)
	}
	switch t.DataType {
	case FP32:
		if len(t.Categories) > 0 {
			return fmt.Errorf("input %q: categories belong to BYTES columns", t.Name)
		}
	case Bytes:
		if len(t.Categories) == 0 {
			return fmt.Errorf("input %q: a BYTES column needs its categories", t.Name)
		}
	default:
		return fmt.Errorf("input %q: a column is FP32 (numbers) or BYTES (categories), not %s", t.Name, t.DataType)
	}
	if t.Labels != "" || t.Softmax || t.Binary != "" {
		return fmt.Errorf("input %q: labels, softmax and binary belong to outputs", t.Name)
	}
	return nil
}

// validateBinary allows binary ("logit" or "probability") on
// floating-point outputs of one value per batch element.
func validateBinary(kind string, t TensorSpec) error {
	if t.Binary == "" {
		return nil
	}
	if kind != "output" {
		return fmt.Errorf("input %q: binary belongs to outputs", t.Name)
	}
	if t.Binary != "logit" && t.Binary != "probability" {
		return fmt.Errorf("output %q: binary is %q (want logit or probability)", t.Name, t.Binary)
	}
	if (t.DataType != FP32 && t.DataType != FP64) || len(t.Dims) != 1 || t.Dims[0] != 1 || t.Softmax {
		return fmt.Errorf("output %q: binary needs an FP32 or FP64 output of dims [1] without softmax", t.Name)
	}
	return nil
}

// validateTensorName requires a name, unique among its kind.
func validateTensorName(kind string, t TensorSpec, seen map[string]bool) error {
	if t.Name == "" {
		return fmt.Errorf("%s without a name", kind)
	}
	if seen[kind+"/"+t.Name] {
		return fmt.Errorf("%s %q is declared twice", kind, t.Name)
	}
	seen[kind+"/"+t.Name] = true
	return nil
}

// validateDataType requires a v2 datatype that a TorchScript tensor holds.
func validateDataType(kind string, t TensorSpec) error {
	if !t.DataType.Known() {
		return fmt.Errorf("%s %q: unknown datatype %q (want one of BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64)", kind, t.Name, t.DataType)
	}
	if _, ok := t.DataType.DType(); !ok {
		return fmt.Errorf("%s %q: datatype %s has no TorchScript tensor type", kind, t.Name, t.DataType)
	}
	return nil
}

// validateDims requires dims, a non-scalar shape without batching, and
// sizes ≥ -1.
func (c *Config) validateDims(kind string, t TensorSpec) error {
	if t.Dims == nil {
		return fmt.Errorf("%s %q: no dims (use [] for a scalar per batch element)", kind, t.Name)
	}
	if c.MaxBatchSize == 0 && len(t.Dims) == 0 {
		return fmt.Errorf("%s %q: dims [] without batching would be a scalar; give max_batch_size or dims", kind, t.Name)
	}
	for i, d := range t.Dims {
		if d < -1 {
			return fmt.Errorf("%s %q: dims[%d] is %d (want -1 for variable, or a size ≥ 0)", kind, t.Name, i, d)
		}
	}
	return nil
}

// validateSoftmax allows softmax on floating-point outputs with a class
// dimension.
func (c *Config) validateSoftmax(kind string, t TensorSpec) error {
	if !t.Softmax {
		return nil
	}
	if kind != "output" {
		return fmt.Errorf("input %q: softmax belongs to outputs", t.Name)
	}
	if t.DataType != FP32 && t.DataType != FP64 {
		return fmt.Errorf("output %q: softmax needs FP32 or FP64, not %s", t.Name, t.DataType)
	}
	if len(t.Dims) == 0 && c.MaxBatchSize > 0 {
		return fmt.Errorf("output %q: softmax needs a class dimension (dims is [])", t.Name)
	}
	return nil
}

// validateLabels allows labels on outputs, as a file inside the model's
// directory.
func validateLabels(kind string, t TensorSpec) error {
	if t.Labels == "" {
		return nil
	}
	if kind != "output" {
		return fmt.Errorf("input %q: labels belong to outputs", t.Name)
	}
	if filepath.IsAbs(t.Labels) || strings.Contains(filepath.ToSlash(t.Labels), "..") {
		return fmt.Errorf("output %q: labels %q must be a file inside the model's directory", t.Name, t.Labels)
	}
	return nil
}

// validateDynamicBatching checks the batcher's settings against
// max_batch_size.
func (c *Config) validateDynamicBatching() error {
	b := c.DynamicBatching
	if b == nil {
		return nil
	}
	if c.MaxBatchSize == 0 {
		return errors.New("dynamic_batching needs max_batch_size > 0")
	}
	if b.MaxQueueDelayUS < 0 {
		return fmt.Errorf("dynamic_batching.max_queue_delay_us is negative (%d)", b.MaxQueueDelayUS)
	}
	if b.MaxQueueSize < 0 {
		return fmt.Errorf("dynamic_batching.max_queue_size is negative (%d)", b.MaxQueueSize)
	}
	for _, s := range b.PreferredBatchSizes {
		if s < 1 || s > c.MaxBatchSize {
			return fmt.Errorf("dynamic_batching.preferred_batch_sizes: %d is not within 1..max_batch_size (%d)", s, c.MaxBatchSize)
		}
	}
	return nil
}

// validateDevice checks the device's spelling and that the linked
// libtorch and this machine have it (core.CheckDevice): a model asking for
// a GPU that is not there is refused here, with the reason, before
// anything is loaded.
func (c *Config) validateDevice() error {
	if c.Device == "" || c.Device == "cpu" {
		return nil
	}
	if err := core.CheckDevice(c.Device); err != nil {
		return fmt.Errorf("device: %w", err)
	}
	return nil
}

func (c *Config) validateInstanceCount() error {
	if c.InstanceCount < 0 {
		return fmt.Errorf("instance_count is negative (%d)", c.InstanceCount)
	}
	return nil
}

// validateVersionPolicy checks each policy given, then that at most one
// is.
func (c *Config) validateVersionPolicy() error {
	p := c.VersionPolicy
	set := 0
	if p.Latest != 0 {
		set++
		if p.Latest < 0 {
			return fmt.Errorf("version_policy.latest is negative (%d)", p.Latest)
		}
	}
	if p.All {
		set++
	}
	if p.Specific != nil {
		set++
		if err := validateSpecific(p.Specific); err != nil {
			return err
		}
	}
	if set > 1 {
		return errors.New("version_policy: give only one of latest, all, specific")
	}
	return nil
}

// validateSpecific requires at least one version, each ≥ 1.
func validateSpecific(versions []int64) error {
	if len(versions) == 0 {
		return errors.New("version_policy.specific lists no versions")
	}
	for _, v := range versions {
		if v < 1 {
			return fmt.Errorf("version_policy.specific: version %d is not ≥ 1", v)
		}
	}
	return nil
}

// validateModelFile requires a plain file name.
func (c *Config) validateModelFile() error {
	if c.ModelFile != "" && (c.ModelFile != filepath.Base(c.ModelFile) || c.ModelFile == "." || c.ModelFile == "..") {
		return fmt.Errorf("model_file %q must be a plain file name", c.ModelFile)
	}
	return nil
}
