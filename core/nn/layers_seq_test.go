package nn_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
)

// seqSpecs are specs with every layer beyond feed-forward, as YAML, with
// the feature count they take.
var seqSpecs = []struct {
	name     string
	yaml     string
	features int64
	out      []int64
}{
	{"transformer", `
input_shape: [6]
layers:
  - {type: embedding, num: 20, out: 8}
  - {type: positional_embedding}
  - {type: transformer_encoder_layer, d_model: 8, nhead: 2, dim_feedforward: 16, dropout: 0.1}
  - {type: transformer_encoder_layer, nhead: 4, dim_feedforward: 16, activation: gelu, norm_first: true}
  - {type: multihead_attention, embed_dim: 8, num_heads: 2}
  - {type: positional_embedding, encoding: sinusoidal}
  - {type: global_avg_pool, dim: 0}
  - {type: linear, out: 3}
`, 6, []int64{3}},
	{"rnn", `
input_shape: [5, 4]
layers:
  - {type: lstm, hidden_size: 6, num_layers: 2, bidirectional: true}
  - {type: gru, hidden_size: 3, output: last}
  - {type: linear, out: 2}
`, 20, []int64{2}},
	{"resnet", `
input_shape: [1, 8, 8]
layers:
  - {type: conv2d, out: 4, kernel: 3, padding: 1}
  - type: residual
    layers:
      - {type: conv2d, out: 4, kernel: 3, padding: 1}
      - {type: batchnorm2d}
      - {type: relu}
      - {type: conv2d, out: 4, kernel: 3, padding: 1}
  - type: residual
    name: down
    layers:
      - {type: conv2d, out: 8, kernel: 3, padding: 1, stride: 2}
      - {type: relu}
  - {type: global_avg_pool2d}
  - type: residual
    layers: [{type: linear, out: 5}, {type: relu}]
  - {type: linear, out: 2}
`, 64, []int64{2}},
}

func TestSequenceLayersBuildAndRun(t *testing.T) {
	for _, c := range seqSpecs {
		t.Run(c.name, func(t *testing.T) {
			s, err := nn.ParseSpec([]byte(c.yaml))
			require.NoError(t, err)
			require.NoError(t, s.CheckLayers())
			net, err := nn.Build(s, c.features, 1)
			require.NoError(t, err)
			defer net.Close()
			assert.Equal(t, c.out, net.Outputs)
			assert.Equal(t, net.Params, net.NumParameters(), "inferred parameter count matches libtorch's")
			x := make([]float32, 3*c.features)
			for i := range x {
				x[i] = float32(i % 7)
			}
			for _, train := range []bool{true, false} {
				require.NoError(t, net.SetTraining(train))
				y := forward(t, net, x, 3, c.features)
				assert.Equal(t, append([]int64{3}, c.out...), y.Shape())
				v, err := core.Data[float32](y)
				require.NoError(t, err)
				for _, e := range v {
					assert.False(t, e != e, "NaN output")
				}
				y.Close()
			}
		})
	}
}

func TestSequenceLayerErrors(t *testing.T) {
	for _, c := range []struct {
		yaml     string
		features int64
		want     string
	}{
		{"input_shape: [4, 6]\nlayers: [{type: multihead_attention, num_heads: 4}]", 24, "embed_dim=6 is not divisible by num_heads=4"},
		{"input_shape: [4, 6]\nlayers: [{type: multihead_attention, embed_dim: 8, num_heads: 2}]", 24, "embed_dim=8 but its input has 6 features"},
		{"input_shape: [4, 6]\nlayers: [{type: transformer_encoder_layer, nhead: 4}]", 24, "d_model=6 is not divisible by nhead=4"},
		{"input_shape: [4, 6]\nlayers: [{type: transformer_encoder_layer, nhead: 2, activation: swish}]", 24, "activation must be relu or gelu"},
		{"layers: [{type: lstm, hidden_size: 4}]", 24, "needs [seq, features] samples"},
		{"input_shape: [4, 6]\nlayers: [{type: gru, hidden_size: 4, batch_first: false}]", 24, "batch_first must be true"},
		{"input_shape: [4, 6]\nlayers: [{type: gru, hidden_size: 4, output: first}]", 24, "output must be sequence or last"},
		{"input_shape: [4, 6]\nlayers: [{type: positional_embedding, max_len: 3}]", 24, "max_len=3 is shorter than the sequence (4)"},
		{"layers: [{type: residual}]", 4, "a residual block needs layers"},
		{"layers: [{type: residual, layers: [{type: flatten}, {type: conv1d, out: 2, kernel: 1}]}]", 4, "inner layer 1"},
		{"input_shape: [2, 4, 4]\nlayers: [{type: residual, layers: [{type: conv2d, out: 2, kernel: 2}]}]", 32, "no linear or 1x1-convolution projection"},
		{"layers: [{type: relu, layers: [{type: relu}]}]", 4, "layers apply to residual blocks only"},
		{"layers: [{type: global_avg_pool2d}]", 4, "needs 3-D samples"},
	} {
		s, err := nn.ParseSpec([]byte(c.yaml))
		require.NoError(t, err, c.yaml)
		_, err = s.Infer(c.features)
		require.Error(t, err, c.yaml)
		assert.Contains(t, err.Error(), c.want, c.yaml)
		assert.True(t, core.HasCode(err, core.InvalidArgument), c.yaml)
	}
	// CheckLayers knows the new types (no "unknown layer type").
	s, err := nn.ParseSpec([]byte("layers: [{type: TransformerEncoderLayer, nhead: 2}, {type: LSTM, hidden_size: 2}, {type: global-avg-pool}]"))
	require.NoError(t, err)
	require.NoError(t, s.CheckLayers())
}
