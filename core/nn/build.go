package nn

import (
	"fmt"
	"math"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/trainer"
)

// ClassName is the TorchScript class of every network Kiln builds.
const ClassName = "__torch__.kiln.Net"

// Buffer is a constant tensor a Prelude's code reads as self.<Name>.
// Exactly one of Float and Int holds its values.
type Buffer struct {
	Name  string
	Shape []int64
	Float []float32
	Int   []int64
}

// Prelude is TorchScript that runs at the start of forward, before the
// layers: typically preprocessing fitted on training data (core/data), so
// that the saved model takes raw features.
type Prelude struct {
	// Inputs is the number of raw columns forward receives.
	Inputs int64
	// Features is the number of columns the code leaves in x.
	Features int64
	// Buffers the code reads; their names must not clash with layers'
	// parameters ("<layer>_weight", ...): prefix them, e.g. "pre_".
	Buffers []Buffer
	// Code is TorchScript statements, one per line, that transform x
	// (float32, [batch, Inputs]) into x ([batch, Features]).
	Code []string
}

// Net is a built network: a TorchScript module in training mode, with what
// shape inference found.
type Net struct {
	*core.Module
	// Layers holds each layer's shapes and parameter count.
	Layers []LayerInfo
	// Params is the number of trainable parameter elements.
	Params int64
	// Inputs is the number of raw input columns forward takes.
	Inputs int64
	// Outputs is the per-sample output shape.
	Outputs []int64
	// Source is forward's TorchScript source ("" for an adopted module).
	Source string
	// InputShape, when set, is the per-sample shape forward takes (a
	// module adopted with Adopt, e.g. [3, 32, 32]): training reshapes the
	// flat feature rows to [batch, InputShape...]. Empty: [batch, Inputs].
	InputShape []int64
}

// Build builds s for samples of `features` values, initializing parameters
// from seed. The caller closes the Net.
func Build(s Spec, features int64, seed uint64) (*Net, error) {
	return BuildWithPrelude(s, Prelude{Inputs: features, Features: features}, seed)
}

// param is one tensor to register.
type param struct {
	name  string
	shape []int64
	init  trainer.Init
	a, b  float64
	dt    native.DType
	learn bool
	// values, when set, are a buffer's fixed float32 contents (init unused).
	values []float32
}

// mix derives an independent seed for the i-th parameter (splitmix64).
func mix(seed uint64, i int) uint64 {
	z := seed + uint64(i+1)*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func f(v float64) string {
	s := fmt.Sprintf("%g", v)
	if !strings.ContainsAny(s, ".eEn") {
		s += ".0"
	}
	return s
}

// layerCode returns the statements and parameters of one layer.
func layerCode(info LayerInfo, l Layer) ([]string, []param) {
	n := info.Name
	in := info.In
	w, b := "self."+n+"_weight", "self."+n+"_bias"
	biasArg := b
	if !hasBias(l) {
		biasArg = "None"
	}
	uni := func(name string, shape []int64, fanIn int64) param {
		// kaiming_uniform_(a=sqrt(5)) and the bias rule both give
		// U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
		bound := 1 / math.Sqrt(float64(fanIn))
		return param{name: name, shape: shape, init: trainer.InitUniform, a: -bound, b: bound, dt: native.Float32, learn: true}
	}
	eps := l.Eps
	if eps == 0 {
		eps = 1e-5
	}
	switch info.Type {
	case "linear":
		fin := in[len(in)-1]
		ps := []param{uni(n+"_weight", []int64{l.Out, fin}, fin)}
		if hasBias(l) {
			ps = append(ps, uni(n+"_bias", []int64{l.Out}, fin))
		}
		return []string{fmt.Sprintf("x = torch.linear(x, %s, %s)", w, biasArg)}, ps
	case "conv1d", "conv2d":
		k := l.Kernel
		shape := []int64{l.Out, in[0], k}
		fin := in[0] * k
		st, pd := "[%d]", "[%d]"
		if info.Type == "conv2d" {
			shape = append(shape, k)
			fin *= k
			st, pd = "[%[1]d, %[1]d]", "[%[1]d, %[1]d]"
		}
		s := l.Stride
		if s == 0 {
			s = 1
		}
		ps := []param{uni(n+"_weight", shape, fin)}
		if hasBias(l) {
			ps = append(ps, uni(n+"_bias", []int64{l.Out}, fin))
		}
		ones := fmt.Sprintf(st, 1)
		return []string{fmt.Sprintf("x = torch.%s(x, %s, %s, %s, %s, %s, 1)", info.Type, w, biasArg,
			fmt.Sprintf(st, s), fmt.Sprintf(pd, l.Padding), ones)}, ps
	case "maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d":
		op := map[string]string{"maxpool1d": "max_pool1d", "maxpool2d": "max_pool2d",
			"avgpool1d": "avg_pool1d", "avgpool2d": "avg_pool2d"}[info.Type]
		s := l.Stride
		if s == 0 {
			s = l.Kernel
		}
		list := func(v int64) string {
			if info.Type[len(info.Type)-2] == '2' {
				return fmt.Sprintf("[%d, %d]", v, v)
			}
			return fmt.Sprintf("[%d]", v)
		}
		return []string{fmt.Sprintf("x = torch.%s(x, %s, %s, %s)", op, list(l.Kernel), list(s), list(l.Padding))}, nil
	case "batchnorm1d", "batchnorm2d":
		c := in[0]
		mom := l.Momentum
		if mom == 0 {
			mom = 0.1
		}
		ps := []param{
			{name: n + "_weight", shape: []int64{c}, init: trainer.InitOnes, dt: native.Float32, learn: true},
			{name: n + "_bias", shape: []int64{c}, init: trainer.InitZeros, dt: native.Float32, learn: true},
			{name: n + "_running_mean", shape: []int64{c}, init: trainer.InitZeros, dt: native.Float32},
			{name: n + "_running_var", shape: []int64{c}, init: trainer.InitOnes, dt: native.Float32},
			{name: n + "_num_batches_tracked", shape: []int64{}, init: trainer.InitZeros, dt: native.Int64},
		}
		code := []string{
			"if self.training:",
			fmt.Sprintf("    self.%s_num_batches_tracked.add_(1)", n),
			fmt.Sprintf("x = torch.batch_norm(x, %s, %s, self.%s_running_mean, self.%s_running_var, self.training, %s, %s, False)",
				w, b, n, n, f(mom), f(eps)),
		}
		return code, ps
	case "layernorm":
		d := in[len(in)-1]
		ps := []param{
			{name: n + "_weight", shape: []int64{d}, init: trainer.InitOnes, dt: native.Float32, learn: true},
			{name: n + "_bias", shape: []int64{d}, init: trainer.InitZeros, dt: native.Float32, learn: true},
		}
		return []string{fmt.Sprintf("x = torch.layer_norm(x, [%d], %s, %s, %s, False)", d, w, b, f(eps))}, ps
	case "dropout":
		return []string{fmt.Sprintf("x = torch.dropout(x, %s, self.training)", f(l.P))}, nil
	case "flatten":
		return []string{"x = torch.flatten(x, 1)"}, nil
	case "embedding":
		ps := []param{{name: n + "_weight", shape: []int64{l.Num, l.Out}, init: trainer.InitNormal, a: 0, b: 1, dt: native.Float32, learn: true}}
		return []string{fmt.Sprintf("x = torch.embedding(%s, x.long())", w)}, ps
	case "relu", "gelu", "sigmoid", "tanh":
		return []string{fmt.Sprintf("x = torch.%s(x)", info.Type)}, nil
	case "softmax":
		d := -1
		if l.Dim != nil {
			d = *l.Dim
			if d >= 0 {
				d++ // the batch dimension comes first
			}
		}
		return []string{fmt.Sprintf("x = torch.softmax(x, %d)", d)}, nil
	}
	if code, ps, ok := seqCode(info, l); ok {
		return code, ps
	}
	panic("nn: layer type passed inference but has no code: " + info.Type)
}

// BuildWithPrelude builds s behind a prelude (preprocessing) that maps
// p.Inputs raw columns to p.Features network features.
func BuildWithPrelude(s Spec, p Prelude, seed uint64) (*Net, error) {
	if p.Inputs <= 0 {
		return nil, fmt.Errorf("kiln: build network: %d input columns", p.Inputs)
	}
	infos, err := s.Infer(p.Features)
	if err != nil {
		return nil, err
	}
	body := ForwardPreamble(s, p)
	var params []param
	var total int64
	for i, info := range infos {
		code, ps := layerCode(info, s.Layers[i])
		body = append(body, code...)
		params = append(params, ps...)
		total += info.Params
	}
	body = append(body, "return x")
	var src strings.Builder
	src.WriteString("def forward(self, x: Tensor) -> Tensor:\n")
	for _, line := range body {
		src.WriteString("    " + line + "\n")
	}

	h, err := trainer.NewModule(ClassName)
	if err != nil {
		return nil, fmt.Errorf("kiln: build network: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			h.Free()
		}
	}()
	for _, b := range p.Buffers {
		if err := addBuffer(h, b); err != nil {
			return nil, fmt.Errorf("kiln: build network: buffer %s: %w", b.Name, err)
		}
	}
	for i, pr := range params {
		if pr.values != nil {
			if err := addBuffer(h, Buffer{Name: pr.name, Shape: pr.shape, Float: pr.values}); err != nil {
				return nil, fmt.Errorf("kiln: build network: %s: %w", pr.name, err)
			}
			continue
		}
		register := trainer.RegisterBufferInit
		if pr.learn {
			register = trainer.RegisterParameterInit
		}
		if err := register(h, pr.name, pr.dt, pr.shape, pr.init, pr.a, pr.b, mix(seed, i)); err != nil {
			return nil, fmt.Errorf("kiln: build network: %s: %w", pr.name, err)
		}
	}
	if err := trainer.Define(h, src.String()); err != nil {
		return nil, fmt.Errorf("kiln: build network: compiling forward: %w", err)
	}
	name := s.Name
	if name == "" {
		name = "net"
	}
	ok = true
	m, err := core.AdoptModule(h, name)
	if err != nil {
		return nil, err
	}
	return &Net{Module: m, Layers: infos, Params: total, Inputs: p.Inputs,
		Outputs: infos[len(infos)-1].Out, Source: src.String()}, nil
}

func addBuffer(h native.Module, b Buffer) error {
	var t *core.Tensor
	var err error
	switch {
	case b.Float != nil && b.Int == nil:
		t, err = core.NewTensor(b.Float, b.Shape...)
	case b.Int != nil && b.Float == nil:
		t, err = core.NewTensor(b.Int, b.Shape...)
	default:
		return fmt.Errorf("exactly one of Float and Int must be set")
	}
	if err != nil {
		return err
	}
	defer t.Close()
	return trainer.RegisterBuffer(h, b.Name, t.Handle())
}

// State returns every parameter and buffer, concatenated in registration
// order as float64: for comparing weights bit for bit.
func (n *Net) State() ([]float64, error) {
	h, err := trainer.FlatState(n.Handle())
	if err != nil {
		return nil, fmt.Errorf("kiln: network state: %w", err)
	}
	t, err := core.AdoptTensor(h)
	if err != nil {
		return nil, err
	}
	defer t.Close()
	return core.CopyData[float64](t)
}

// Forward runs the network on a batch x ([batch, Inputs]) without
// recording gradients, in the current mode (SetTraining(false) for
// predictions). Unlike core.Module.Forward it works on a network that has
// trained in this process. The caller closes the result, which is the
// single output in a slice for symmetry with core.Module.
func (n *Net) Forward(inputs ...*core.Tensor) ([]*core.Tensor, error) {
	if len(inputs) != 1 || inputs[0] == nil {
		return nil, fmt.Errorf("kiln: network forward takes one input tensor, got %d", len(inputs))
	}
	var out native.Tensor
	err := inputs[0].Use(func(x native.Tensor) error {
		h := n.Handle()
		if !h.Valid() {
			return core.ErrClosed
		}
		var err error
		out, err = trainer.Forward(h, x)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("kiln: forward %s: %w", n.Module, err)
	}
	t, err := core.AdoptTensor(out)
	if err != nil {
		return nil, err
	}
	return []*core.Tensor{t}, nil
}
