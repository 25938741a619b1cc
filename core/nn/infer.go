package nn

import (
	"fmt"
	"math"
	"regexp"
)

// LayerInfo is what shape inference found for one layer.
type LayerInfo struct {
	// Index in Spec.Layers, Name (defaulted) and normalized Type.
	Index int
	Name  string
	Type  string
	// In and Out are per-sample shapes (no batch dimension).
	In, Out []int64
	// Params is the number of trainable parameter elements.
	Params int64
}

var ident = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// layerError names the layer a problem is in.
func layerError(i int, l Layer, format string, args ...any) error {
	name := l.Name
	if name == "" {
		name = fmt.Sprintf("l%d", i)
	}
	return fmt.Errorf("kiln: layer %d (%s %q): %s", i, l.Type, name, fmt.Sprintf(format, args...))
}

func prod(s []int64) int64 {
	n := int64(1)
	for _, d := range s {
		n *= d
	}
	return n
}

func hasBias(l Layer) bool { return l.Bias == nil || *l.Bias }

// Infer validates s for samples of the given flat feature count and
// returns every layer's input and output shapes. Errors name the layer.
func (s Spec) Infer(features int64) ([]LayerInfo, error) {
	if features <= 0 {
		return nil, fmt.Errorf("kiln: network input has %d features", features)
	}
	shape := []int64{features}
	if len(s.InputShape) > 0 {
		for _, d := range s.InputShape {
			if d <= 0 {
				return nil, fmt.Errorf("kiln: input_shape %v has a non-positive dimension", s.InputShape)
			}
		}
		if prod(s.InputShape) != features {
			return nil, fmt.Errorf("kiln: input_shape %v holds %d values but samples have %d features",
				s.InputShape, prod(s.InputShape), features)
		}
		shape = append([]int64(nil), s.InputShape...)
	}
	if len(s.Layers) == 0 {
		return nil, fmt.Errorf("kiln: network spec has no layers")
	}
	names := map[string]int{}
	infos := make([]LayerInfo, 0, len(s.Layers))
	for i, l := range s.Layers {
		info := LayerInfo{Index: i, Name: l.Name, Type: kind(l.Type), In: shape}
		if info.Name == "" {
			info.Name = fmt.Sprintf("l%d", i)
		}
		if !ident.MatchString(info.Name) {
			return nil, layerError(i, l, "name must be an identifier (letters, digits, _)")
		}
		if j, dup := names[info.Name]; dup {
			return nil, layerError(i, l, "name already used by layer %d", j)
		}
		names[info.Name] = i
		out, params, err := infer(info.Type, l, shape)
		if err != nil {
			return nil, layerError(i, l, "%v", err)
		}
		for _, d := range out {
			if d <= 0 {
				return nil, layerError(i, l, "output shape %v is empty (input %v too small)", out, shape)
			}
		}
		info.Out, info.Params = out, params
		infos = append(infos, info)
		shape = out
	}
	return infos, nil
}

// convOut is the output length of a convolution or pooling window.
func convOut(n, k, s, p int64) int64 { return (n+2*p-k)/s + 1 }

func needPositive(what string, v int64) error {
	if v <= 0 {
		return fmt.Errorf("%s must be > 0, got %d", what, v)
	}
	return nil
}

func infer(t string, l Layer, in []int64) ([]int64, int64, error) {
	bias := int64(0)
	switch t {
	case "linear":
		if err := needPositive("out", l.Out); err != nil {
			return nil, 0, err
		}
		f := in[len(in)-1]
		if l.In != 0 && l.In != f {
			return nil, 0, fmt.Errorf("in=%d but its input has %d features (shape %v)", l.In, f, in)
		}
		if hasBias(l) {
			bias = l.Out
		}
		out := append(append([]int64(nil), in[:len(in)-1]...), l.Out)
		return out, f*l.Out + bias, nil
	case "conv1d", "conv2d":
		nd := 2
		if t == "conv2d" {
			nd = 3
		}
		if len(in) != nd {
			return nil, 0, fmt.Errorf("needs [channels%s] samples, got shape %v", map[int]string{2: ", length", 3: ", height, width"}[nd], in)
		}
		if err := needPositive("out", l.Out); err != nil {
			return nil, 0, err
		}
		if err := needPositive("kernel", l.Kernel); err != nil {
			return nil, 0, err
		}
		if l.In != 0 && l.In != in[0] {
			return nil, 0, fmt.Errorf("in=%d channels but its input has %d (shape %v)", l.In, in[0], in)
		}
		s := l.Stride
		if s == 0 {
			s = 1
		}
		if s < 0 || l.Padding < 0 {
			return nil, 0, fmt.Errorf("stride and padding must be >= 0")
		}
		out := []int64{l.Out}
		w := l.Out * in[0]
		for _, n := range in[1:] {
			out = append(out, convOut(n, l.Kernel, s, l.Padding))
			w *= l.Kernel
		}
		if hasBias(l) {
			bias = l.Out
		}
		return out, w + bias, nil
	case "maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d":
		nd := 2
		if t[len(t)-2] == '2' {
			nd = 3
		}
		if len(in) != nd {
			return nil, 0, fmt.Errorf("needs %d-D samples (channels first), got shape %v", nd, in)
		}
		if err := needPositive("kernel", l.Kernel); err != nil {
			return nil, 0, err
		}
		s := l.Stride
		if s == 0 {
			s = l.Kernel
		}
		if s < 0 || l.Padding < 0 || 2*l.Padding > l.Kernel {
			return nil, 0, fmt.Errorf("stride must be >= 0 and padding in [0, kernel/2]")
		}
		out := []int64{in[0]}
		for _, n := range in[1:] {
			out = append(out, convOut(n, l.Kernel, s, l.Padding))
		}
		return out, 0, nil
	case "batchnorm1d", "batchnorm2d":
		ok := len(in) == 1 || len(in) == 2
		if t == "batchnorm2d" {
			ok = len(in) == 3
		}
		if !ok {
			return nil, 0, fmt.Errorf("cannot normalize samples of shape %v", in)
		}
		if l.In != 0 && l.In != in[0] {
			return nil, 0, fmt.Errorf("in=%d features but its input has %d (shape %v)", l.In, in[0], in)
		}
		if l.Momentum < 0 || l.Momentum > 1 || l.Eps < 0 {
			return nil, 0, fmt.Errorf("momentum must be in [0, 1] and eps >= 0")
		}
		return in, 2 * in[0], nil
	case "layernorm":
		if l.Eps < 0 {
			return nil, 0, fmt.Errorf("eps must be >= 0")
		}
		return in, 2 * in[len(in)-1], nil
	case "dropout":
		if l.P < 0 || l.P >= 1 || math.IsNaN(l.P) {
			return nil, 0, fmt.Errorf("p must be in [0, 1), got %v", l.P)
		}
		return in, 0, nil
	case "flatten":
		return []int64{prod(in)}, 0, nil
	case "embedding":
		if err := needPositive("num", l.Num); err != nil {
			return nil, 0, err
		}
		if err := needPositive("out", l.Out); err != nil {
			return nil, 0, err
		}
		return append(append([]int64(nil), in...), l.Out), l.Num * l.Out, nil
	case "relu", "gelu", "sigmoid", "tanh":
		return in, 0, nil
	case "softmax":
		if l.Dim != nil && (*l.Dim >= len(in) || *l.Dim < -len(in)) {
			return nil, 0, fmt.Errorf("dim %d out of range for samples of shape %v", *l.Dim, in)
		}
		return in, 0, nil
	case "":
		return nil, 0, fmt.Errorf("missing type")
	}
	return nil, 0, fmt.Errorf("unknown layer type %q (want linear, conv1d, conv2d, maxpool1d, maxpool2d, avgpool1d, avgpool2d, batchnorm1d, batchnorm2d, layernorm, dropout, flatten, embedding, relu, gelu, sigmoid, tanh or softmax)", l.Type)
}
