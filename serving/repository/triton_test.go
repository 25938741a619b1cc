package repository

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	yaml "go.yaml.in/yaml/v3"

	"github.com/kilnml/kiln/core"
)

// goodTritonYAML is goodYAML in Triton's spellings.
const goodTritonYAML = `
name: mlp
platform: pytorch_libtorch
max_batch_size: 16
input:
  - {name: x, data_type: TYPE_FP32, dims: [-1, 8]}
output:
  - {name: logits, data_type: TYPE_FP32, dims: [3], label_filename: labels.txt}
dynamic_batching:
  max_queue_delay_microseconds: 500
  preferred_batch_size: [4, 8]
  default_queue_policy: {max_queue_size: 64}
instance_group: [{count: 1, kind: KIND_CPU}, {count: 1}]
version_policy: {latest: {num_versions: 2}}
`

// goodPbtxt is goodYAML as a Triton config.pbtxt.
const goodPbtxt = `
name: "mlp"
platform: "pytorch_libtorch"
max_batch_size: 16
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ -1, 8 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 3 ]
    label_filename: "labels.txt"
  }
]
dynamic_batching {
  max_queue_delay_microseconds: 500
  preferred_batch_size: [ 4, 8 ]
  default_queue_policy { max_queue_size: 64 }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 2 } }
`

func TestTritonSpellingsInYAML(t *testing.T) {
	kiln, err := ParseConfig([]byte(goodYAML), false)
	require.NoError(t, err)
	triton, err := ParseConfig([]byte(goodTritonYAML), false)
	require.NoError(t, err)
	assert.Equal(t, kiln, triton)

	pbtxt, err := ParseTritonConfig([]byte(goodPbtxt))
	require.NoError(t, err)
	assert.Equal(t, kiln, pbtxt)
}

func TestTritonSpellingsInJSON(t *testing.T) {
	kiln, err := ParseConfig([]byte(`{"name":"ids","inputs":[{"name":"ids","datatype":"INT64","dims":[2,3]}],
		"outputs":[{"name":"emb","datatype":"FP32","dims":[2,3,3]}],"version_policy":{"specific":[1,3]},
		"model_file":"m.pt","dynamic_batching":{},"max_batch_size":4}`), true)
	require.NoError(t, err)
	triton, err := ParseConfig([]byte(`{"name":"ids","input":[{"name":"ids","data_type":"TYPE_INT64","dims":[2,3]}],
		"output":[{"name":"emb","data_type":"TYPE_FP32","dims":[2,3,3]}],"version_policy":{"specific":{"versions":[1,3]}},
		"default_model_filename":"m.pt","backend":"pytorch","dynamic_batching":{},"max_batch_size":4}`), true)
	require.NoError(t, err)
	assert.Equal(t, kiln, triton)
	assert.NotNil(t, triton.DynamicBatching, "dynamic_batching {} turns the batcher on")

	all, err := ParseConfig([]byte(`{"input":[{"name":"x","data_type":"TYPE_FP32","dims":[1]}],
		"output":[{"name":"y","data_type":"TYPE_FP32","dims":[1]}],"version_policy":{"all":{}}}`), true)
	require.NoError(t, err)
	assert.True(t, all.VersionPolicy.All)
}

func TestTritonSpellingErrors(t *testing.T) {
	base := "input: [{name: x, data_type: TYPE_FP32, dims: [8]}]\noutput: [{name: y, data_type: TYPE_FP32, dims: [3]}]\n"
	cases := map[string]struct{ yaml, want string }{
		"both inputs":           {base + "inputs: [{name: x, datatype: FP32, dims: [8]}]\n", "give inputs or input (Triton's spelling), not both"},
		"both datatypes":        {"input: [{name: x, datatype: FP32, data_type: TYPE_FP32, dims: [8]}]\noutput: [{name: y, data_type: TYPE_FP32, dims: [3]}]\n", `input "x": give datatype or data_type`},
		"bad data_type":         {"input: [{name: x, data_type: FP32, dims: [8]}]\noutput: [{name: y, data_type: TYPE_FP32, dims: [3]}]\n", `input "x": unknown data_type "FP32"`},
		"string":                {"input: [{name: x, data_type: TYPE_STRING, dims: [8]}]\noutput: [{name: y, data_type: TYPE_FP32, dims: [3]}]\n", "BYTES has no TorchScript tensor type"},
		"gpus on cpu":           {base + "instance_group: [{gpus: [0]}]\n", "instance_group[0]: gpus [0] with kind KIND_AUTO (use KIND_GPU"},
		"two gpus":              {base + "instance_group: [{kind: KIND_GPU, gpus: [0, 1]}]\n", "instance_group[0]: gpus [0 1]: Kiln places a model version on one device; list one GPU"},
		"negative gpu":          {base + "instance_group: [{kind: KIND_GPU, gpus: [-1]}]\n", "instance_group[0]: gpus [-1]: a GPU index is ≥ 0"},
		"cpu and gpu":           {base + "instance_group: [{kind: KIND_CPU}, {kind: KIND_GPU, gpus: [1]}]\n", "instance_group[1]: places the model on cuda:1, instance_group[0] on cpu"},
		"kind model":            {base + "instance_group: [{kind: KIND_MODEL}]\n", "kind KIND_MODEL is not supported"},
		"device clash":          {base + "device: cuda:1\ninstance_group: [{kind: KIND_GPU, gpus: [0]}]\n", `device "cuda:1" and instance_group (Triton's spelling, cuda:0) disagree`},
		"bad device":            {base + "device: gpu0\n", `device: kiln: device "gpu0": want cpu, cuda or cuda:N`},
		"both instances":        {base + "instance_count: 2\ninstance_group: [{count: 2}]\n", "give instance_count or instance_group"},
		"backend":               {base + "backend: onnxruntime\n", `backend "onnxruntime" is not supported`},
		"backend clash":         {base + "backend: pytorch\nplatform: tensorflow_savedmodel\n", `backend "pytorch" does not run platform`},
		"both delays":           {base + "max_batch_size: 4\ndynamic_batching: {max_queue_delay_us: 1, max_queue_delay_microseconds: 2}\n", "give dynamic_batching.max_queue_delay_us or max_queue_delay_microseconds"},
		"both files":            {base + "model_file: a.pt\ndefault_model_filename: b.pt\n", "give model_file or default_model_filename"},
		"queue timeout":         {base + "max_batch_size: 4\ndynamic_batching: {default_queue_policy: {default_timeout_microseconds: 5}}\n", "field default_timeout_microseconds not found"},
		"latest field":          {base + "version_policy: {latest: {count: 2}}\n", `version_policy.latest: unknown field "count" (want num_versions)`},
		"all field":             {base + "version_policy: {all: {x: 1}}\n", `version_policy.all: unknown field "x" (want no fields)`},
		"reshape":               {"input: [{name: x, data_type: TYPE_FP32, dims: [8], reshape: {shape: [2, 4]}}]\noutput: [{name: y, data_type: TYPE_FP32, dims: [3]}]\n", `input "x": reshape [2 4] differs from dims [8]`},
		"num_versions 0":        {base + "version_policy: {latest: {num_versions: 0}}\n", "num_versions is 0 (want ≥ 1)"},
		"triton empty specific": {base + "version_policy: {specific: {versions: []}}\n", "specific lists no versions"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml), false)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	c, err := ParseConfig([]byte("input: [{name: x, data_type: TYPE_FP32, dims: [8], reshape: {shape: [8]}}]\noutput: [{name: y, data_type: TYPE_FP32, dims: [3]}]\n"), false)
	require.NoError(t, err, "a reshape equal to dims changes nothing")
	assert.Equal(t, []int64{8}, c.Inputs[0].Dims)
}

func TestParseTritonConfigIndexedNames(t *testing.T) {
	c, err := ParseTritonConfig([]byte(`
backend: "pytorch"
max_batch_size: 8
input [
  { name: "INPUT__1" data_type: TYPE_INT64 dims: [ 2 ] },
  { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }
]
output { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] }
output { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ ] }
dynamic_batching { }
`))
	require.NoError(t, err)
	assert.Equal(t, Platform, c.Platform)
	assert.Equal(t, []TensorSpec{{Name: "INPUT__0", DataType: FP32, Dims: []int64{4}}, {Name: "INPUT__1", DataType: Int64, Dims: []int64{2}}}, c.Inputs)
	assert.Equal(t, "OUTPUT__0", c.Outputs[0].Name)
	assert.Equal(t, []int64{}, c.Outputs[1].Dims)
	assert.Equal(t, &DynamicBatching{}, c.DynamicBatching, "dynamic_batching {} turns the batcher on")
	assert.Equal(t, 1, c.Instances())

	// Names outside the convention keep the file's order.
	c, err = ParseTritonConfig([]byte(`input [{ name: "b" data_type: TYPE_FP32 dims: [1] }, { name: "a" data_type: TYPE_FP32 dims: [1] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]`))
	require.NoError(t, err)
	assert.Equal(t, "b", c.Inputs[0].Name)
}

func TestParseTritonConfigErrors(t *testing.T) {
	io := "input [{ name: \"x\" data_type: TYPE_FP32 dims: [4] }]\noutput [{ name: \"y\" data_type: TYPE_FP32 dims: [3] }]\n"
	cases := map[string]struct{ pbtxt, want string }{
		"unknown field":   {"max_batch_size: 4\n" + io + "  sequence_batching { }\n", "invalid protobuf text: line 4:3: unknown field: sequence_batching"},
		"eof":             {"max_batch_size: 4\ninput [{ name: \"x\" \n", "invalid protobuf text: line 3: unexpected end of file"},
		"syntax":          {"max_batch_size: 4\nname: : \"x\"\n", "invalid protobuf text: line 2:7: syntax error"},
		"two gpus":        {io + "instance_group [{ kind: KIND_GPU gpus: [0, 2] }]\n", "instance_group[0]: gpus [0 2]: Kiln places a model version on one device"},
		"parameters":      {io + "parameters { key: \"INFERENCE_MODE\" value { string_value: \"true\" } }\n", "parameters is set, and Kiln does not support it"},
		"warmup":          {io + "model_warmup [{ name: \"w\" batch_size: 1 }]\n", "model_warmup is set"},
		"optional":        {"input [{ name: \"x\" data_type: TYPE_FP32 dims: [4] optional: true }]\noutput [{ name: \"y\" data_type: TYPE_FP32 dims: [3] }]\n", "input[0].optional is set"},
		"queue timeout":   {"max_batch_size: 4\n" + io + "dynamic_batching { default_queue_policy { default_timeout_microseconds: 5 } }\n", "dynamic_batching.default_queue_policy.default_timeout_microseconds is set"},
		"platform":        {"platform: \"onnxruntime_onnx\"\n" + io, `platform "onnxruntime_onnx" is not supported`},
		"indices":         {"input [{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: [4] }, { name: \"INPUT__2\" data_type: TYPE_FP32 dims: [4] }]\noutput [{ name: \"y\" data_type: TYPE_FP32 dims: [3] }]\n", `input "INPUT__2": with every input named <name>__<index>, the indices must be 0..1`},
		"latest 0":        {io + "version_policy { latest { } }\n", "num_versions is 0"},
		"no batch scalar": {"input [{ name: \"x\" data_type: TYPE_FP32 }]\noutput [{ name: \"y\" data_type: TYPE_FP32 dims: [3] }]\n", `input "x": dims [] without batching`},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ParseTritonConfig([]byte(tc.pbtxt))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestRepositoryTritonModel(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "mlp", TritonConfigFile), goodPbtxt)
	write(t, filepath.Join(root, "mlp", "labels.txt"), "a\nb\nc\n")
	write(t, filepath.Join(root, "mlp", "1", "model.pt"), "x")
	write(t, filepath.Join(root, "mlp", "2", "model.pt"), "x")
	write(t, filepath.Join(root, "bad", TritonConfigFile), "name: \"bad\"\nmax_batch_size: 4\n  bogus: 1\n")
	write(t, filepath.Join(root, "bad", "1", "model.pt"), "x")
	write(t, filepath.Join(root, "both", TritonConfigFile), "")
	write(t, filepath.Join(root, "both", "config.yaml"), "")

	r, err := Open(root)
	require.NoError(t, err)
	names, err := r.Names()
	require.NoError(t, err)
	assert.Equal(t, []string{"bad", "both", "mlp"}, names)

	m, err := r.Model("mlp")
	require.NoError(t, err)
	assert.Equal(t, []int64{1, 2}, m.Selected())
	assert.Equal(t, []string{"a", "b", "c"}, m.Labels["logits"])
	assert.Equal(t, filepath.Join(root, "mlp", "2", "model.pt"), m.ModelPath(2))
	want, err := ParseConfig([]byte(goodYAML), false)
	require.NoError(t, err)
	assert.Equal(t, want, m.Config)

	_, err = r.Model("bad")
	require.EqualError(t, err, `model "bad": config.pbtxt: invalid protobuf text: line 3:3: unknown field: bogus`)
	_, err = r.Model("both")
	require.ErrorContains(t, err, "both a Kiln and a Triton configuration")
	require.ErrorContains(t, err, "config.yaml and config.pbtxt (keep one)")
}

// FuzzParseConfig checks that Kiln's config.yaml/config.json decoding never
// panics, and that a configuration it accepts validates again unchanged.
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{goodYAML, goodTritonYAML,
		"inputs: [{name: x, datatype: FP32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\nversion_policy: {specific: [7]}\n",
		"version_policy: {latest: {num_versions: 2}, all: {}, specific: {versions: [1]}}\n",
		"max_batch_size: 0\n", "inputs: [\n",
		"inputs: [{name: x, datatype: FP32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\ndevice: cuda:1\n",
		"inputs: [{name: x, datatype: FP32, dims: [8]}]\noutputs: [{name: y, datatype: FP32, dims: [3]}]\ndevice: cpu\ninstance_group: [{kind: KIND_GPU, gpus: [2]}]\n"} {
		f.Add([]byte(s), false)
	}
	for _, s := range []string{
		`{"name":"ids","max_batch_size":0,"inputs":[{"name":"ids","datatype":"INT64","dims":[2,3]}],"outputs":[{"name":"emb","datatype":"FP32","dims":[2,3,3]}],"version_policy":{"specific":[1,3]},"warmup":false}`,
		`{"input":[{"name":"x","data_type":"TYPE_FP32","dims":[1]}],"output":[{"name":"y","data_type":"TYPE_FP32","dims":[1]}],"version_policy":{"all":{},"latest":{"num_versions":1}}}`,
		`{"inputs": [], "bogus": 1}`,
	} {
		f.Add([]byte(s), true)
	}
	f.Fuzz(func(t *testing.T, raw []byte, isJSON bool) {
		c, err := ParseConfig(raw, isJSON)
		if err != nil {
			return
		}
		again := *c
		require.NoError(t, again.Validate())
		assert.Equal(t, *c, again)
	})
}

// FuzzParseTritonConfig checks that config.pbtxt decoding never panics, and
// that a configuration it accepts validates again unchanged.
func FuzzParseTritonConfig(f *testing.F) {
	for _, s := range []string{goodPbtxt,
		"backend: \"pytorch\"\nmax_batch_size: 8\ninput [{ name: \"INPUT__1\" data_type: TYPE_INT64 dims: [2] }, { name: \"INPUT__0\" data_type: TYPE_FP32 dims: [4] }]\noutput { name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [3] }\ndynamic_batching { }\n",
		"input [{ name: \"x\" data_type: TYPE_FP32 dims: [4] optional: true }]\n",
		"version_policy { specific { versions: [1, 3] } }\ninstance_group [{ count: 3 kind: KIND_GPU gpus: [0] }]\n",
		"max_batch_size: 4\ninput [{ name: \"x\" \n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		c, err := ParseTritonConfig(raw)
		if err != nil {
			if strings.Contains(err.Error(), "proto:") {
				t.Errorf("error keeps prototext's prefix: %v", err)
			}
			return
		}
		again := *c
		require.NoError(t, again.Validate())
		assert.Equal(t, *c, again)
	})
}

// Triton's KIND_GPU instance groups and Kiln's device key place the model;
// on a libtorch without CUDA (Debian's 1.13) validation then refuses it
// with the reason, which is what the index and readiness report.
func TestDevicePlacement(t *testing.T) {
	base := "input: [{name: x, data_type: TYPE_FP32, dims: [8]}]\noutput: [{name: y, data_type: TYPE_FP32, dims: [3]}]\n"
	for _, tc := range []struct{ yaml, device string }{
		{base, ""},
		{base + "device: cpu\n", "cpu"},
		{base + "instance_group: [{count: 2, kind: KIND_CPU}]\n", ""},
		{base + "instance_group: [{count: 2, kind: KIND_GPU}]\n", "cuda:0"},
		{base + "instance_group: [{kind: KIND_GPU, gpus: [3]}, {count: 2, kind: KIND_GPU, gpus: [3]}]\n", "cuda:3"},
		{base + "device: cuda:3\ninstance_group: [{kind: KIND_GPU, gpus: [3]}]\n", "cuda:3"},
		{base + "device: cuda\n", "cuda"},
	} {
		var f configFile
		require.NoError(t, yaml.Unmarshal([]byte(tc.yaml), &f), tc.yaml)
		c, err := f.config()
		require.NoError(t, err, tc.yaml)
		assert.Equal(t, tc.device, c.Device, tc.yaml)
		err = c.Validate()
		if tc.device == "" || tc.device == "cpu" || core.CUDADeviceCount() > 0 {
			assert.NoError(t, err, tc.yaml)
			continue
		}
		require.Error(t, err, tc.yaml)
		assert.Contains(t, err.Error(), "device: kiln: device "+tc.device+": ")
		if !core.CUDACompiled() {
			assert.Contains(t, err.Error(), "has no CUDA")
			assert.Equal(t, core.Unsupported, core.CodeOf(err))
		}
	}
	c, err := ParseTritonConfig([]byte("input [{ name: \"x\" data_type: TYPE_FP32 dims: [4] }]\noutput [{ name: \"y\" data_type: TYPE_FP32 dims: [3] }]\ninstance_group [{ count: 2 kind: KIND_GPU gpus: [1] }]\n"))
	if core.CUDADeviceCount() > 1 {
		require.NoError(t, err)
		assert.Equal(t, "cuda:1", c.Device)
		assert.Equal(t, 2, c.Instances())
		return
	}
	require.Error(t, err)
	assert.Contains(t, err.Error(), "device cuda:1")
}
