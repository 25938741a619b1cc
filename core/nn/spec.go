// Package nn defines Kiln networks: a declarative Spec (JSON or YAML, or
// built in Go with Sequential, Linear, Conv2d, ...), validated with shape
// inference, and built into a TorchScript module whose parameters are
// initialized as PyTorch initializes them and whose forward is TorchScript
// source generated from the spec. The built module trains in package
// core/train and saves as TorchScript that Python's torch.jit.load reads.
package nn

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	yaml "go.yaml.in/yaml/v3"

	"github.com/kilnml/kiln/core"
)

// Spec declares a feed-forward network: layers applied in order.
type Spec struct {
	// Name is informational, e.g. "digits-cnn".
	Name string `json:"name,omitempty"`
	// InputShape is the shape of one sample as the first layer sees it,
	// e.g. [1, 8, 8] for an 8×8 one-channel image. The flat feature vector
	// is reshaped to it. Empty means [number of features].
	InputShape []int64 `json:"input_shape,omitempty"`
	// Layers, applied in order.
	Layers []Layer `json:"layers"`
}

// Layer is one layer of a Spec. Type selects the layer; the other fields
// apply to the types that document them and must otherwise be zero.
type Layer struct {
	// Type is one of linear, conv1d, conv2d, maxpool1d, maxpool2d,
	// avgpool1d, avgpool2d, batchnorm1d, batchnorm2d, layernorm, dropout,
	// flatten, embedding, relu, gelu, sigmoid, tanh, softmax, residual,
	// multihead_attention, transformer_encoder_layer, lstm, gru,
	// positional_embedding, global_avg_pool (global_avg_pool1d,
	// global_avg_pool2d) (case and
	// underscores ignored: "MaxPool2d" and "max_pool2d" are maxpool2d).
	Type string `json:"type"`
	// Name names the layer's parameters ("<name>_weight"); it must be an
	// identifier. Default "l<index>".
	Name string `json:"name,omitempty"`
	// In is the expected input size: features of linear, channels of
	// conv/batchnorm. Optional; inferred, and checked when given.
	In int64 `json:"in,omitempty"`
	// Out is linear's output features, conv's output channels, or
	// embedding's vector size.
	Out int64 `json:"out,omitempty"`
	// Kernel is the (square) kernel size of conv and pooling layers.
	Kernel int64 `json:"kernel,omitempty"`
	// Stride of conv (default 1) and pooling (default Kernel).
	Stride int64 `json:"stride,omitempty"`
	// Padding of conv and pooling layers (default 0).
	Padding int64 `json:"padding,omitempty"`
	// Bias of linear and conv layers (default true).
	Bias *bool `json:"bias,omitempty"`
	// P is dropout's drop probability, in [0, 1).
	P float64 `json:"p,omitempty"`
	// Eps of batchnorm and layernorm (default 1e-5).
	Eps float64 `json:"eps,omitempty"`
	// Momentum of batchnorm's running statistics (default 0.1).
	Momentum float64 `json:"momentum,omitempty"`
	// Num is embedding's number of vectors (indices 0..Num-1).
	Num int64 `json:"num,omitempty"`
	// Dim is softmax's dimension within a sample (default the last), or
	// the sample dimension global_avg_pool averages over (default: all
	// but the first, the channels).
	Dim *int `json:"dim,omitempty"`

	// The fields below belong to the layers beyond feed-forward
	// (layers_seq.go); they follow torch.nn's argument names.

	// Layers is the body of a residual block: y = body(x) + x, with a
	// projection of x when the body changes its shape.
	Layers []Layer `json:"layers,omitempty"`
	// EmbedDim and NumHeads of multihead_attention (embed_dim is the
	// input's last dimension; given, it is checked).
	EmbedDim int64 `json:"embed_dim,omitempty"`
	NumHeads int64 `json:"num_heads,omitempty"`
	// Dropout of multihead_attention, transformer_encoder_layer and
	// between lstm/gru layers (default 0: Kiln's default, not torch's 0.1).
	Dropout float64 `json:"dropout,omitempty"`
	// BatchFirst must be true (or unset): Kiln's tensors are always
	// [batch, sequence, features].
	BatchFirst *bool `json:"batch_first,omitempty"`
	// DModel, NHead, DimFeedforward (default 2048), Activation (relu or
	// gelu) and NormFirst of transformer_encoder_layer.
	DModel         int64  `json:"d_model,omitempty"`
	NHead          int64  `json:"nhead,omitempty"`
	DimFeedforward int64  `json:"dim_feedforward,omitempty"`
	Activation     string `json:"activation,omitempty"`
	NormFirst      bool   `json:"norm_first,omitempty"`
	// HiddenSize, NumLayers (default 1) and Bidirectional of lstm and gru;
	// Output is "sequence" (default: every step, [seq, D*hidden]) or
	// "last" (the last layer's final hidden state, [D*hidden]; forward
	// then backward direction).
	HiddenSize    int64  `json:"hidden_size,omitempty"`
	NumLayers     int64  `json:"num_layers,omitempty"`
	Bidirectional bool   `json:"bidirectional,omitempty"`
	Output        string `json:"output,omitempty"`
	// MaxLen of positional_embedding: the longest sequence (default the
	// input's length); Encoding is "learned" (default) or "sinusoidal".
	MaxLen   int64  `json:"max_len,omitempty"`
	Encoding string `json:"encoding,omitempty"`
}

// Sequential makes a Spec of layers.
func Sequential(layers ...Layer) Spec { return Spec{Layers: layers} }

// WithInputShape returns s with the per-sample input shape set.
func (s Spec) WithInputShape(shape ...int64) Spec {
	s.InputShape = shape
	return s
}

// Linear is a fully connected layer with out features (y = x Wᵀ + b).
func Linear(out int64) Layer { return Layer{Type: "linear", Out: out} }

// Conv1d is a 1-D convolution with out channels and a kernel of size k.
func Conv1d(out, k int64) Layer { return Layer{Type: "conv1d", Out: out, Kernel: k} }

// Conv2d is a 2-D convolution with out channels and a k×k kernel.
func Conv2d(out, k int64) Layer { return Layer{Type: "conv2d", Out: out, Kernel: k} }

// MaxPool1d is 1-D max pooling over windows of k (stride k).
func MaxPool1d(k int64) Layer { return Layer{Type: "maxpool1d", Kernel: k} }

// MaxPool2d is 2-D max pooling over k×k windows (stride k).
func MaxPool2d(k int64) Layer { return Layer{Type: "maxpool2d", Kernel: k} }

// AvgPool1d is 1-D average pooling over windows of k (stride k).
func AvgPool1d(k int64) Layer { return Layer{Type: "avgpool1d", Kernel: k} }

// AvgPool2d is 2-D average pooling over k×k windows (stride k).
func AvgPool2d(k int64) Layer { return Layer{Type: "avgpool2d", Kernel: k} }

// BatchNorm1d normalizes features ([C] or [C, L] samples) with batch
// statistics in training and running statistics in eval mode.
func BatchNorm1d() Layer { return Layer{Type: "batchnorm1d"} }

// BatchNorm2d normalizes the channels of [C, H, W] samples.
func BatchNorm2d() Layer { return Layer{Type: "batchnorm2d"} }

// LayerNorm normalizes over the last dimension, with a learned scale and
// shift.
func LayerNorm() Layer { return Layer{Type: "layernorm"} }

// Dropout zeroes elements with probability p in training.
func Dropout(p float64) Layer { return Layer{Type: "dropout", P: p} }

// Flatten flattens each sample to one dimension.
func Flatten() Layer { return Layer{Type: "flatten"} }

// Embedding maps integer indices in [0, num) to learned vectors of size
// out. Its input values are used as indices, so train it on unscaled
// columns (core/data Options.Scale "none").
func Embedding(num, out int64) Layer { return Layer{Type: "embedding", Num: num, Out: out} }

// ReLU is max(x, 0).
func ReLU() Layer { return Layer{Type: "relu"} }

// GELU is the Gaussian error linear unit (exact form).
func GELU() Layer { return Layer{Type: "gelu"} }

// Sigmoid is 1/(1+e^-x).
func Sigmoid() Layer { return Layer{Type: "sigmoid"} }

// Tanh is the hyperbolic tangent.
func Tanh() Layer { return Layer{Type: "tanh"} }

// Softmax normalizes the last dimension of each sample to probabilities.
func Softmax() Layer { return Layer{Type: "softmax"} }

// Named returns l with its name set.
func (l Layer) Named(name string) Layer {
	l.Name = name
	return l
}

// kind normalizes a layer type: lower case, no underscores or dashes.
func kind(t string) string {
	return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(strings.TrimSpace(t)))
}

// Decode parses JSON or YAML (JSON is YAML too, but its errors are better
// from the JSON decoder) into v, rejecting unknown fields so that a typo
// in a spec is an error rather than a silently ignored setting.
func Decode(data []byte, v any) error {
	trim := bytes.TrimSpace(data)
	if len(trim) == 0 {
		return fmt.Errorf("empty document")
	}
	js := trim
	if trim[0] != '{' && trim[0] != '[' {
		var doc any
		if err := yaml.Unmarshal(trim, &doc); err != nil {
			return fmt.Errorf("yaml: %w", err)
		}
		doc, err := jsonable(doc)
		if err != nil {
			return fmt.Errorf("yaml: %w", err)
		}
		if js, err = json.Marshal(doc); err != nil {
			return fmt.Errorf("yaml: %w", err)
		}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	return nil
}

// jsonable converts YAML's map[any]any-free tree (yaml.v3 decodes into
// map[string]any) into something encoding/json accepts, rejecting
// non-string keys.
func jsonable(v any) (any, error) {
	switch t := v.(type) {
	case map[string]any:
		for k, e := range t {
			c, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			t[k] = c
		}
		return t, nil
	case map[any]any:
		m := make(map[string]any, len(t))
		for k, e := range t {
			ks, ok := k.(string)
			if !ok {
				return nil, fmt.Errorf("non-string key %v", k)
			}
			c, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			m[ks] = c
		}
		return m, nil
	case []any:
		for i, e := range t {
			c, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			t[i] = c
		}
		return t, nil
	}
	return v, nil
}

// ParseSpec reads a Spec from JSON or YAML. It checks the syntax and the
// field names only; Spec.Infer validates the network. Errors are
// INVALID_ARGUMENT.
func ParseSpec(data []byte) (Spec, error) {
	var s Spec
	if err := Decode(data, &s); err != nil {
		return Spec{}, core.Errorf(core.InvalidArgument, "kiln: network spec: %v", err)
	}
	return s, nil
}
