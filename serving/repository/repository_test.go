package repository

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const goodYAML = `
name: mlp
platform: pytorch_torchscript
max_batch_size: 16
inputs:
  - {name: x, datatype: FP32, dims: [-1, 8]}
outputs:
  - {name: logits, datatype: FP32, dims: [3], labels: labels.txt}
dynamic_batching:
  max_queue_delay_us: 500
  preferred_batch_sizes: [4, 8]
  max_queue_size: 64
instance_count: 2
version_policy: {latest: 2}
`

func write(t *testing.T, path, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
}

func TestParseConfigYAML(t *testing.T) {
	c, err := ParseConfig([]byte(goodYAML), false)
	require.NoError(t, err)
	assert.Equal(t, "mlp", c.Name)
	assert.Equal(t, Platform, c.Platform)
	assert.Equal(t, 16, c.MaxBatchSize)
	assert.Equal(t, []TensorSpec{{Name: "x", DataType: FP32, Dims: []int64{-1, 8}}}, c.Inputs)
	assert.Equal(t, "labels.txt", c.Outputs[0].Labels)
	require.NotNil(t, c.DynamicBatching)
	assert.Equal(t, int64(500), c.DynamicBatching.MaxQueueDelayUS)
	assert.Equal(t, []int{4, 8}, c.DynamicBatching.PreferredBatchSizes)
	assert.Equal(t, 64, c.DynamicBatching.MaxQueueSize)
	assert.Equal(t, 2, c.Instances())
	assert.Equal(t, 2, c.VersionPolicy.Latest)
	assert.True(t, c.WarmupEnabled())
	assert.True(t, c.OptimizeForInferenceEnabled(), "on by default")
}

func TestParseConfigJSON(t *testing.T) {
	c, err := ParseConfig([]byte(`{"name":"ids","max_batch_size":0,
		"inputs":[{"name":"ids","datatype":"INT64","dims":[2,3]}],
		"outputs":[{"name":"emb","datatype":"FP32","dims":[2,3,3]}],
		"version_policy":{"specific":[1,3]}, "warmup": false, "optimize_for_inference": false}`), true)
	require.NoError(t, err)
	assert.Equal(t, Int64, c.Inputs[0].DataType)
	assert.Equal(t, []int64{1, 3}, c.VersionPolicy.Specific)
	assert.Equal(t, 1, c.Instances())
	assert.False(t, c.WarmupEnabled())
	assert.False(t, c.OptimizeForInferenceEnabled())
	assert.Nil(t, c.DynamicBatching)
}

func TestParseConfigErrors(t *testing.T) {
	base := "inputs: [{name: x, datatype: FP32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n"
	cases := map[string]struct{ yaml, want string }{
		"unknown field":    {base + "max_batch: 3\n", "field max_batch not found"},
		"platform":         {base + "platform: onnxruntime_onnx\n", `platform "onnxruntime_onnx" is not supported`},
		"no inputs":        {"outputs: [{name: y, datatype: FP32, dims: [3]}]\n", "no inputs"},
		"no outputs":       {"inputs: [{name: x, datatype: FP32, dims: [8]}]\n", "no outputs"},
		"bad datatype":     {"inputs: [{name: x, datatype: FLOAT, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n", `input "x": unknown datatype "FLOAT"`},
		"uint32":           {"inputs: [{name: x, datatype: UINT32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n", "UINT32 has no TorchScript tensor type"},
		"bad dim":          {"inputs: [{name: x, datatype: FP32, dims: [-2]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n", `input "x": dims[0] is -2`},
		"no dims":          {"inputs: [{name: x, datatype: FP32}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n", `input "x": no dims`},
		"dup input":        {"inputs: [{name: x, datatype: FP32, dims: [1]}, {name: x, datatype: FP32, dims: [1]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n", `input "x" is declared twice`},
		"neg batch":        {base + "max_batch_size: -1\n", "max_batch_size is negative"},
		"batching w/o max": {base + "dynamic_batching: {max_queue_delay_us: 10}\n", "dynamic_batching needs max_batch_size > 0"},
		"preferred":        {base + "max_batch_size: 4\ndynamic_batching: {preferred_batch_sizes: [8]}\n", "preferred_batch_sizes: 8 is not within 1..max_batch_size (4)"},
		"neg delay":        {base + "max_batch_size: 4\ndynamic_batching: {max_queue_delay_us: -5}\n", "max_queue_delay_us is negative"},
		"two policies":     {base + "version_policy: {latest: 1, all: true}\n", "give only one of latest, all, specific"},
		"empty specific":   {base + "version_policy: {specific: []}\n", "specific lists no versions"},
		"instances":        {base + "instance_count: -2\n", "instance_count is negative"},
		"labels escape":    {"inputs: [{name: x, datatype: FP32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3], labels: ../x}]\n", "must be a file inside"},
		"model file":       {base + "model_file: a/b.pt\n", "must be a plain file name"},
		"yaml syntax":      {"inputs: [\n", "invalid YAML"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml), false)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	_, err := ParseConfig([]byte(`{"inputs": [], "bogus": 1}`), true)
	require.ErrorContains(t, err, `unknown field "bogus"`)
}

func TestRepositoryModel(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "mlp", "config.yaml"), goodYAML)
	write(t, filepath.Join(root, "mlp", "labels.txt"), "setosa\nversicolor\nvirginica\n\n")
	for _, v := range []string{"1", "3", "10"} {
		write(t, filepath.Join(root, "mlp", v, "model.pt"), "x")
	}
	require.NoError(t, os.MkdirAll(filepath.Join(root, "mlp", "notaversion"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "mlp", "007"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "empty"), 0o755))   // no config: not a model
	write(t, filepath.Join(root, "other", "config.json"), `{"inputs": 1}`) // listed, fails to read

	r, err := Open(root)
	require.NoError(t, err)
	names, err := r.Names()
	require.NoError(t, err)
	assert.Equal(t, []string{"mlp", "other"}, names)

	m, err := r.Model("mlp")
	require.NoError(t, err)
	assert.Equal(t, []int64{1, 3, 10}, m.Versions)
	assert.Equal(t, []int64{3, 10}, m.Selected())
	assert.Equal(t, []string{"setosa", "versicolor", "virginica"}, m.Labels["logits"])
	assert.Equal(t, filepath.Join(root, "mlp", "10", "model.pt"), m.ModelPath(10))

	m.Config.VersionPolicy = VersionPolicy{All: true}
	assert.Equal(t, []int64{1, 3, 10}, m.Selected())
	m.Config.VersionPolicy = VersionPolicy{Specific: []int64{3, 4}}
	assert.Equal(t, []int64{3}, m.Selected())
	m.Config.VersionPolicy = VersionPolicy{}
	assert.Equal(t, []int64{10}, m.Selected())

	_, err = r.Model("other")
	require.ErrorContains(t, err, "config.json: invalid JSON")
	_, err = r.Model("nope")
	require.ErrorIs(t, err, ErrNotFound)
	_, err = r.Model("../etc")
	require.ErrorIs(t, err, ErrNotFound)
}

func TestRepositoryModelErrors(t *testing.T) {
	root := t.TempDir()
	r, err := Open(root)
	require.NoError(t, err)

	write(t, filepath.Join(root, "a", "config.yaml"), goodYAML)
	_, err = r.Model("a")
	require.ErrorContains(t, err, `name "mlp" differs from the directory's name`)

	write(t, filepath.Join(root, "mlp", "config.yaml"), goodYAML)
	write(t, filepath.Join(root, "mlp", "1", "model.pt"), "x")
	_, err = r.Model("mlp")
	require.ErrorContains(t, err, `output "logits": labels`)

	write(t, filepath.Join(root, "mlp", "labels.txt"), "\n\n")
	_, err = r.Model("mlp")
	require.ErrorContains(t, err, "holds no labels")

	write(t, filepath.Join(root, "nov", "config.yaml"), "inputs: [{name: x, datatype: FP32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\n")
	_, err = r.Model("nov")
	require.ErrorContains(t, err, "no version directories")

	write(t, filepath.Join(root, "spec", "config.yaml"), "inputs: [{name: x, datatype: FP32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\nversion_policy: {specific: [7]}\n")
	write(t, filepath.Join(root, "spec", "1", "model.pt"), "x")
	_, err = r.Model("spec")
	require.ErrorContains(t, err, "version policy specific [7] selects none of the versions [1]")

	_, err = Open(filepath.Join(root, "missing"))
	require.Error(t, err)
}

func TestDataType(t *testing.T) {
	for _, d := range []DataType{Bool, Uint8, Int8, Int16, Int32, Int64, FP16, BF16, FP32, FP64} {
		dt, ok := d.DType()
		require.True(t, ok, d)
		assert.Equal(t, dt.Size(), d.Size(), d)
		back, err := FromDType(dt)
		require.NoError(t, err)
		assert.Equal(t, d, back)
	}
	_, ok := Bytes.DType()
	assert.False(t, ok)
	assert.False(t, DataType("FLOAT").Known())
}

func TestSoftmaxConfig(t *testing.T) {
	c, err := ParseConfig([]byte(`max_batch_size: 4
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: p, datatype: FP32, dims: [3], softmax: true}]`), false)
	require.NoError(t, err)
	assert.True(t, c.Outputs[0].Softmax)
	for cfg, want := range map[string]string{
		`{"max_batch_size": 4, "inputs": [{"name": "x", "datatype": "FP32", "dims": [4], "softmax": true}], "outputs": [{"name": "p", "datatype": "FP32", "dims": [3]}]}`:  "softmax belongs to outputs",
		`{"max_batch_size": 4, "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}], "outputs": [{"name": "p", "datatype": "INT64", "dims": [3], "softmax": true}]}`: "softmax needs FP32 or FP64",
		`{"max_batch_size": 4, "inputs": [{"name": "x", "datatype": "FP32", "dims": [4]}], "outputs": [{"name": "p", "datatype": "FP32", "dims": [], "softmax": true}]}`:   "class dimension",
	} {
		_, err := ParseConfig([]byte(cfg), true)
		assert.ErrorContains(t, err, want)
	}
}

func TestFingerprintFollowsFiles(t *testing.T) {
	root := t.TempDir()
	write := func(rel, text string) {
		p := filepath.Join(root, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(text), 0o644))
	}
	write("m/config.yaml", "max_batch_size: 0\n")
	write("m/1/model.pt", "one")
	r, err := Open(root)
	require.NoError(t, err)
	fp1, err := r.Fingerprint("m")
	require.NoError(t, err)
	again, err := r.Fingerprint("m")
	require.NoError(t, err)
	assert.Equal(t, fp1, again, "stable while nothing changes")
	write("m/2/model.pt", "two")
	fp2, err := r.Fingerprint("m")
	require.NoError(t, err)
	assert.NotEqual(t, fp1, fp2, "a new version changes it")
	write("m/2/model.pt", "two, longer")
	fp3, err := r.Fingerprint("m")
	require.NoError(t, err)
	assert.NotEqual(t, fp2, fp3, "a rewritten model file changes it")
	_, err = r.Fingerprint("absent")
	assert.ErrorIs(t, err, ErrNotFound)
}
