package nn

import (
	"fmt"
	"math"
	"math/bits"
	"regexp"
	"slices"
	"strings"

	"github.com/kilnml/kiln/core"
)

// Limits that Spec.Infer (and so Build) enforces, so that a spec that
// parses but declares an absurd network is refused with an
// INVALID_ARGUMENT error before libtorch allocates anything.
const (
	// MaxLayers is the most layers a Spec may have.
	MaxLayers = 1024
	// MaxParams is the most trainable parameter elements a network may
	// have in all (2^30: 4 GiB of float32 weights, before optimizer state).
	MaxParams = 1 << 30
	// MaxSampleValues is the most values one sample may have at the input
	// or output of any layer (2^28: 1 GiB of float32 per sample), and the
	// largest any size field of a layer (in, out, kernel, stride, padding,
	// num) or input_shape dimension may be.
	MaxSampleValues = 1 << 28
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
// The error is INVALID_ARGUMENT.
func layerError(i int, l Layer, format string, args ...any) error {
	name := l.Name
	if name == "" {
		name = fmt.Sprintf("l%d", i)
	}
	return core.Errorf(core.InvalidArgument, "kiln: layer %d (%s %q): %s", i, l.Type, name, fmt.Sprintf(format, args...))
}

// prod is the product of the (positive) dimensions s, or -1 when it
// exceeds MaxSampleValues.
func prod(s []int64) int64 {
	n := int64(1)
	for _, d := range s {
		if n = mulLimit(n, d, MaxSampleValues); n < 0 {
			return -1
		}
	}
	return n
}

// mulLimit returns a*b for a, b >= 0, or -1 when the product exceeds
// limit (or int64).
func mulLimit(a, b, limit int64) int64 {
	if a < 0 || b < 0 {
		return -1
	}
	hi, lo := bits.Mul64(uint64(a), uint64(b))
	if hi != 0 || lo > uint64(limit) {
		return -1
	}
	return int64(lo)
}

// checkSizes refuses a layer whose size fields are negative where a size
// is meant or beyond MaxSampleValues, and float settings that are not
// finite, before any arithmetic on them.
func checkSizes(l Layer) error {
	if len(l.Layers) > 0 && kind(l.Type) != "residual" {
		return fmt.Errorf("layers apply to residual blocks only")
	}
	for _, f := range []struct {
		name string
		v    int64
	}{{"in", l.In}, {"out", l.Out}, {"kernel", l.Kernel}, {"stride", l.Stride}, {"padding", l.Padding}, {"num", l.Num}} {
		if f.v > MaxSampleValues {
			return fmt.Errorf("%s=%d is larger than the limit %d", f.name, f.v, MaxSampleValues)
		}
		if f.v < 0 {
			return fmt.Errorf("%s must be >= 0, got %d", f.name, f.v)
		}
	}
	for _, f := range []struct {
		name string
		v    float64
	}{{"p", l.P}, {"eps", l.Eps}, {"momentum", l.Momentum}} {
		if math.IsNaN(f.v) || math.IsInf(f.v, 0) {
			return fmt.Errorf("%s must be a finite number, got %v", f.name, f.v)
		}
	}
	return nil
}

func hasBias(l Layer) bool { return l.Bias == nil || *l.Bias }

// Infer validates s for samples of the given flat feature count and
// returns every layer's input and output shapes. Errors are
// INVALID_ARGUMENT and name the layer; a network beyond MaxLayers,
// MaxParams or MaxSampleValues is refused.
func (s Spec) Infer(features int64) ([]LayerInfo, error) {
	if features <= 0 || features > MaxSampleValues {
		return nil, core.Errorf(core.InvalidArgument, "kiln: network input has %d features (want 1 to %d)", features, MaxSampleValues)
	}
	shape := []int64{features}
	if len(s.InputShape) > 0 {
		if len(s.InputShape) > 8 {
			return nil, core.Errorf(core.InvalidArgument, "kiln: input_shape has %d dimensions (at most 8)", len(s.InputShape))
		}
		for _, d := range s.InputShape {
			if d <= 0 {
				return nil, core.Errorf(core.InvalidArgument, "kiln: input_shape %v has a non-positive dimension", s.InputShape)
			}
		}
		if n := prod(s.InputShape); n != features {
			if n < 0 {
				return nil, core.Errorf(core.InvalidArgument, "kiln: input_shape %v holds more than %d values but samples have %d features",
					s.InputShape, MaxSampleValues, features)
			}
			return nil, core.Errorf(core.InvalidArgument, "kiln: input_shape %v holds %d values but samples have %d features",
				s.InputShape, n, features)
		}
		shape = append([]int64(nil), s.InputShape...)
	}
	if len(s.Layers) == 0 {
		return nil, core.Errorf(core.InvalidArgument, "kiln: network spec has no layers")
	}
	if len(s.Layers) > MaxLayers {
		return nil, core.Errorf(core.InvalidArgument, "kiln: network spec has %d layers, more than the limit %d", len(s.Layers), MaxLayers)
	}
	var total int64
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
		if err := checkSizes(l); err != nil {
			return nil, layerError(i, l, "%v", err)
		}
		out, params, err := infer(info.Type, l, shape)
		if err != nil {
			return nil, layerError(i, l, "%v", err)
		}
		for _, d := range out {
			if d <= 0 {
				return nil, layerError(i, l, "output shape %v is empty (input %v too small)", out, shape)
			}
		}
		if prod(out) < 0 {
			return nil, layerError(i, l, "output shape %v holds more than %d values per sample", out, MaxSampleValues)
		}
		if params < 0 || params > MaxParams-total {
			return nil, layerError(i, l, "the network would have more than %d parameters", int64(MaxParams))
		}
		total += params
		info.Out, info.Params = out, params
		infos = append(infos, info)
		shape = out
	}
	return infos, nil
}

// convOut is the output length of a convolution or pooling window, or 0
// when the kernel is larger than the padded input (libtorch refuses it).
// Sizes are at most MaxSampleValues, so the sum cannot overflow.
func convOut(n, k, s, p int64) int64 {
	if n+2*p < k {
		return 0
	}
	return (n+2*p-k)/s + 1
}

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
		w := mulLimit(l.Out, in[0], MaxParams)
		for _, n := range in[1:] {
			out = append(out, convOut(n, l.Kernel, s, l.Padding))
			w = mulLimit(w, l.Kernel, MaxParams)
		}
		if w < 0 {
			return nil, 0, fmt.Errorf("its weight would have more than %d elements", int64(MaxParams))
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
	if out, params, err, ok := inferSeq(t, l, in); ok {
		return out, params, err
	}
	return nil, 0, fmt.Errorf("unknown layer type %q (want %s or %s)", l.Type,
		strings.Join(LayerTypes[:len(LayerTypes)-1], ", "), LayerTypes[len(LayerTypes)-1])
}

// LayerTypes are the layer types a Spec may name (case, '_' and '-' aside:
// "BatchNorm1d", "batch_norm1d" and "batchnorm1d" are one type).
var LayerTypes = []string{"linear", "conv1d", "conv2d", "maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d",
	"batchnorm1d", "batchnorm2d", "layernorm", "dropout", "flatten", "embedding", "relu", "gelu", "sigmoid",
	"tanh", "softmax", "residual", "multiheadattention", "transformerencoderlayer", "lstm", "gru",
	"positionalembedding", "globalavgpool", "globalavgpool1d", "globalavgpool2d"}

// CheckLayers reports what can be checked of s before the data's width is
// known: there are layers, at most MaxLayers, each of a known type (see
// LayerTypes) with sizes within the limits. Errors are INVALID_ARGUMENT
// and name the layer. Infer checks the rest once the features are known.
func (s Spec) CheckLayers() error {
	if len(s.Layers) == 0 {
		return core.Errorf(core.InvalidArgument, "kiln: network spec has no layers")
	}
	if len(s.Layers) > MaxLayers {
		return core.Errorf(core.InvalidArgument, "kiln: network spec has %d layers, more than the limit %d", len(s.Layers), MaxLayers)
	}
	for i, l := range s.Layers {
		t := kind(l.Type)
		if t == "" {
			return layerError(i, l, "missing type")
		}
		if !slices.Contains(LayerTypes, t) {
			_, _, err := infer(t, l, []int64{1})
			return layerError(i, l, "%v", err)
		}
		if err := checkSizes(l); err != nil {
			return layerError(i, l, "%v", err)
		}
	}
	return nil
}
