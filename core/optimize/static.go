package optimize

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/optimize"
	"github.com/kilnml/kiln/native/trainer"
)

// Static int8 quantization (post-training, calibrated):
//
//   - The float network runs on the calibration rows through an observer
//     forward that returns the minimum and maximum of every activation
//     that will be quantized: the input of each run of quantized layers
//     and the output of each quantized layer (after its ReLU when one
//     follows, since the two fuse). Min/max over all rows gives the range,
//     widened to include 0, as PyTorch's MinMaxObserver does.
//   - Activations are quint8, per tensor, affine: scale = (max-min)/(qmax-qmin),
//     zero point = qmin - round(min/scale). On fbgemm, x86 and onednn the
//     range is reduced to 7 bits (0..127), as PyTorch's default qconfigs
//     for those engines do: without VNNI their int8 kernels add u8×s8
//     pairs into saturating int16 (vpmaddubsw). qnnpack uses 0..255.
//   - Weights are qint8, symmetric (zero point 0, scale max|w|/127.5), per
//     output channel or per tensor (Options.Weights); by default as
//     PyTorch's default qconfig for the engine has it: per tensor on
//     qnnpack, per channel on the others. Every engine of libtorch 1.13
//     packs both. Per channel is more accurate; it stores a float64 scale
//     and an int64 zero point per output channel, which in a small
//     network (64 inputs per neuron) makes the file about 10% larger.
//   - The generated forward keeps preprocessing in float, quantizes x
//     (quantize_per_tensor) where a run of linear/conv layers starts, calls
//     quantized::linear, conv1d, conv2d (a batchnorm right after one is
//     folded into its weights and bias; the _relu variants where a ReLU
//     follows, skipping eval-mode dropout in between), keeps max pooling,
//     flatten and ReLU on the quantized tensor, and dequantizes before any
//     other layer (batchnorm, layernorm, gelu, sigmoid, tanh, softmax,
//     average pooling, embedding) and at the end.

// Static int8 weight schemes (Options.Weights).
const (
	PerChannel = "per-channel"
	PerTensor  = "per-tensor"
)

// QParams are the affine quantization parameters of one activation.
type QParams struct {
	// At says where in the network the activation is, e.g. "input of l0"
	// or "output of l0 (relu l1)".
	At        string  `json:"at"`
	Min       float64 `json:"min"`
	Max       float64 `json:"max"`
	Scale     float64 `json:"scale"`
	ZeroPoint int64   `json:"zero_point"`
}

// StaticInfo is what static int8 quantization recorded.
type StaticInfo struct {
	// CalibrationRows is the number of rows the ranges were observed on.
	CalibrationRows int `json:"calibration_rows"`
	// Observer is the activation range estimate ("minmax").
	Observer string `json:"observer"`
	// Activations are quint8 with values in [0, QuantMax] (127 with
	// reduce_range, else 255).
	QuantMax int64 `json:"activation_quant_max"`
	// Weights describes the weight quantization, e.g. "qint8 symmetric per
	// channel".
	Weights string `json:"weights"`
	// Quantized and Float name the layers that run in int8 and in float.
	Quantized []string `json:"quantized_layers"`
	Float     []string `json:"float_layers,omitempty"`
	// Activations holds every quantized activation's range and qparams.
	Activations []QParams `json:"activations"`
}

func quantizableStatic(t string) bool { return t == "linear" || t == "conv1d" || t == "conv2d" }

// passQuantized says whether a layer runs on a quantized tensor as it is,
// keeping its quantization parameters.
func passQuantized(t string) bool {
	switch t {
	case "relu", "maxpool1d", "maxpool2d", "flatten", "dropout":
		return true
	}
	return false
}

// staticStep is one layer of a static int8 forward.
type staticStep struct {
	// quantizeIn: x is float here and the layer is quantized: quantize x
	// with activation obsIn first.
	quantizeIn bool
	obsIn      int
	// quantized: a linear/conv layer producing activation obsOut, with
	// the batchnorm at layer bn folded into its weights and the ReLU at
	// layer fused fused into its kernel (-1: none); its output is
	// observed after layer end.
	quantized bool
	obsOut    int
	bn, fused int
	end       int
	// skip: a ReLU fused into an earlier layer or an eval-mode dropout
	// inside a quantized run.
	skip bool
	// dequantizeIn: x is quantized here and the layer runs in float.
	dequantizeIn bool
}

// staticPlan decides, layer by layer, what runs in int8; it returns the
// steps, the number of observed activations, whether x ends quantized and
// the activations' descriptions.
func staticPlan(net *nn.Net) ([]staticStep, []string, bool) {
	steps := make([]staticStep, len(net.Layers))
	var at []string
	inQ := false
	for i := range steps {
		steps[i].obsIn, steps[i].obsOut, steps[i].bn, steps[i].fused = -1, -1, -1, -1
	}
	next := func(j int) int { // skips eval-mode dropout
		for j < len(net.Layers) && net.Layers[j].Type == "dropout" {
			j++
		}
		return j
	}
	for i, info := range net.Layers {
		st := &steps[i]
		switch {
		case st.skip:
		case quantizableStatic(info.Type):
			if !inQ {
				st.quantizeIn, st.obsIn = true, len(at)
				at = append(at, "input of "+info.Name)
				inQ = true
			}
			st.quantized, st.end = true, i
			desc := "output of " + info.Name
			if j := next(i + 1); j < len(net.Layers) && foldable(info, net.Layers[j]) {
				st.bn, st.end = j, j
				desc += " (batchnorm " + net.Layers[j].Name + " folded)"
			}
			if j := next(st.end + 1); j < len(net.Layers) && net.Layers[j].Type == "relu" {
				st.fused, st.end = j, j
				desc += " (relu " + net.Layers[j].Name + ")"
			}
			for k := i + 1; k <= st.end; k++ {
				steps[k].skip = true
			}
			st.obsOut = len(at)
			at = append(at, desc)
		case inQ && passQuantized(info.Type):
			if info.Type == "dropout" {
				st.skip = true
			}
		default:
			if inQ {
				st.dequantizeIn = true
				inQ = false
			}
		}
	}
	return steps, at, inQ
}

// tsFloat formats v as a TorchScript float literal that round-trips.
func tsFloat(v float64) string {
	s := strconv.FormatFloat(v, 'g', -1, 64)
	if !strings.ContainsAny(s, ".eEn") {
		s += ".0"
	}
	return s
}

// newVariant returns an empty module of Kiln's network class holding the
// prelude's buffers; the caller frees it on error.
func newVariant(src *Source) (native.Module, error) {
	h, err := trainer.NewModule(nn.ClassName)
	if err != nil {
		return h, fmt.Errorf("kiln: optimize: %w", err)
	}
	for _, b := range src.Prelude.Buffers {
		if err := addBuffer(h, b); err != nil {
			h.Free()
			return native.Module{}, fmt.Errorf("kiln: optimize: buffer %s: %w", b.Name, err)
		}
	}
	return h, nil
}

func defineForward(h native.Module, body []string, ret string) error {
	var s strings.Builder
	s.WriteString("def forward(self, x: Tensor) -> Tensor:\n")
	for _, line := range body {
		s.WriteString("    " + line + "\n")
	}
	s.WriteString("    return " + ret + "\n")
	return optimize.Define(h, s.String())
}

// observe runs the float network over the calibration rows and returns
// the minimum and maximum of each observed activation.
func observe(src *Source, net *nn.Net, spec nn.Spec, steps []staticStep, at []string, cal *data.Dataset) (mins, maxs []float64, err error) {
	n := len(at)
	h, err := newVariant(src)
	if err != nil {
		return nil, nil, err
	}
	ok := false
	defer func() {
		if !ok {
			h.Free()
		}
	}()
	body := nn.ForwardPreamble(spec, src.Prelude)
	rec := func(k int) string { return fmt.Sprintf("o%d = torch.stack([torch.min(x), torch.max(x)])", k) }
	for i, info := range net.Layers {
		l := spec.Layers[i]
		for _, name := range nn.LayerTensors(info, l) {
			if err := copyTensor(h, net.Handle(), name, nil, false); err != nil {
				return nil, nil, err
			}
		}
		if steps[i].quantizeIn {
			body = append(body, rec(steps[i].obsIn))
		}
		body = append(body, nn.LayerSource(info, l)...)
		for j := range i + 1 {
			if steps[j].obsOut >= 0 && steps[j].end == i {
				body = append(body, rec(steps[j].obsOut))
			}
		}
	}
	outs := make([]string, n)
	for k := range outs {
		outs[k] = fmt.Sprintf("o%d", k)
	}
	if err := defineForward(h, body, "torch.stack(["+strings.Join(outs, ", ")+"])"); err != nil {
		return nil, nil, fmt.Errorf("kiln: optimize: compiling the calibration forward: %w", err)
	}
	ok = true
	m, err := core.AdoptModule(h, spec.Name+"-observer")
	if err != nil {
		return nil, nil, err
	}
	defer m.Close()
	if err := m.SetTraining(false); err != nil {
		return nil, nil, err
	}
	mins, maxs = make([]float64, n), make([]float64, n)
	for k := range n {
		mins[k], maxs[k] = math.Inf(1), math.Inf(-1)
	}
	const batch = 256
	f := cal.Features
	for lo := 0; lo < cal.Len(); lo += batch {
		hi := min(lo+batch, cal.Len())
		x, err := core.NewTensor(cal.X[lo*f:hi*f], int64(hi-lo), int64(f))
		if err != nil {
			return nil, nil, err
		}
		out, err := m.Forward(x)
		x.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("kiln: optimize: calibration rows %d-%d: %w", lo+1, hi, err)
		}
		v, err := core.CopyData[float32](out[0])
		for _, o := range out {
			o.Close()
		}
		if err != nil {
			return nil, nil, err
		}
		for k := range n {
			a, b := float64(v[2*k]), float64(v[2*k+1])
			if math.IsNaN(a) || math.IsNaN(b) || math.IsInf(a, 0) || math.IsInf(b, 0) {
				return nil, nil, fmt.Errorf("kiln: optimize: calibration rows %d-%d give non-finite activations at the %s", lo+1, hi, at[k])
			}
			mins[k], maxs[k] = min(mins[k], a), max(maxs[k], b)
		}
	}
	return mins, maxs, nil
}

// affineQParams computes quint8 scale and zero point for the range
// [lo, hi] (widened to include 0) over [0, qmax], as PyTorch's
// MinMaxObserver does for per-tensor affine activations.
func affineQParams(lo, hi float64, qmax int64) (float64, int64) {
	lo, hi = min(lo, 0), max(hi, 0)
	scale := (hi - lo) / float64(qmax)
	if scale < 1.1920928955078125e-07 { // float32 eps
		scale = 1.1920928955078125e-07
	}
	zp := int64(-math.Round(lo / scale))
	return scale, min(max(zp, 0), qmax)
}

// reduceRange says whether an engine's activations use 7 bits.
func reduceRange(engine string) bool { return engine != "qnnpack" }

// QuantizeStatic builds a TorchScript module computing net (spec behind
// src's prelude) with its linear and conv layers in static int8 for the
// quantized engine (which the caller has selected), activation ranges
// observed on cal (raw input rows, as the model takes them). The module
// is in eval mode; the caller closes it. weights is PerChannel, PerTensor
// or "" (the engine's default).
func QuantizeStatic(src *Source, net *nn.Net, spec nn.Spec, engine string, cal *data.Dataset, weights string) (*core.Module, *StaticInfo, error) {
	weights, err := staticWeights(engine, weights)
	if err != nil {
		return nil, nil, err
	}
	if err := checkStatic(src, net, cal); err != nil {
		return nil, nil, err
	}
	steps, at, endQ := staticPlan(net)
	info, scales, zps, err := calibrate(src, net, spec, engine, weights, steps, at, cal)
	if err != nil {
		return nil, nil, err
	}
	h, err := newVariant(src)
	if err != nil {
		return nil, nil, err
	}
	ok := false
	defer func() {
		if !ok {
			h.Free()
		}
	}()
	b := &staticBuild{src: src, net: net, spec: spec, engine: engine, perTensor: weights == PerTensor,
		steps: steps, scales: scales, zps: zps, h: h}
	if err := b.forward(endQ); err != nil {
		return nil, nil, err
	}
	ok = true
	info.Quantized, info.Float = b.qnames, b.fnames
	m, err := core.AdoptModule(h, spec.Name+"-int8-static")
	if err != nil {
		return nil, nil, err
	}
	if err := m.SetTraining(false); err != nil {
		m.Close()
		return nil, nil, err
	}
	return m, info, nil
}

// staticWeights resolves the weight scheme: weights itself, or for "" the
// engine's default (per tensor on qnnpack, per channel on the others).
func staticWeights(engine, weights string) (string, error) {
	switch weights {
	case "":
		if engine == "qnnpack" {
			return PerTensor, nil
		}
		return PerChannel, nil
	case PerChannel, PerTensor:
		return weights, nil
	}
	return "", fmt.Errorf("kiln: optimize: unknown weight scheme %q (want %s or %s)", weights, PerChannel, PerTensor)
}

// checkStatic rejects a network without a layer static int8 quantizes, or
// calibration rows src's model does not take.
func checkStatic(src *Source, net *nn.Net, cal *data.Dataset) error {
	var kinds []string
	for _, info := range net.Layers {
		kinds = append(kinds, info.Type)
	}
	if !slices.ContainsFunc(kinds, quantizableStatic) {
		return fmt.Errorf("kiln: optimize: nothing to quantize to static int8: the network has no linear or conv layers (it has %s)",
			strings.Join(kinds, ", "))
	}
	return checkCalibration(src, cal)
}

// calibrate observes the ranges of the activations at (as steps plans
// them) on cal and works out their quantization parameters for the
// engine; it returns the record so far and each activation's scale and
// zero point.
func calibrate(src *Source, net *nn.Net, spec nn.Spec, engine, weights string, steps []staticStep, at []string, cal *data.Dataset) (*StaticInfo, []float64, []int64, error) {
	mins, maxs, err := observe(src, net, spec, steps, at, cal)
	if err != nil {
		return nil, nil, nil, err
	}
	qmax := int64(255)
	if reduceRange(engine) {
		qmax = 127
	}
	info := &StaticInfo{CalibrationRows: cal.Len(), Observer: "minmax", QuantMax: qmax, Weights: "qint8 symmetric " + weights}
	scales, zps := make([]float64, len(at)), make([]int64, len(at))
	for k := range at {
		scales[k], zps[k] = affineQParams(mins[k], maxs[k], qmax)
		info.Activations = append(info.Activations, QParams{At: at[k], Min: mins[k], Max: maxs[k], Scale: scales[k], ZeroPoint: zps[k]})
	}
	return info, scales, zps, nil
}

// staticBuild writes a static int8 forward into the new module h: the
// packed weights and float tensors it needs, and the TorchScript source.
type staticBuild struct {
	src       *Source
	net       *nn.Net
	spec      nn.Spec
	engine    string
	perTensor bool
	steps     []staticStep
	// scales and zps are the activations' quantization parameters.
	scales []float64
	zps    []int64
	h      native.Module
	// body is forward's source so far; qnames and fnames name the layers
	// that run in int8 and in float.
	body           []string
	qnames, fnames []string
}

// forward writes every layer's step into h and compiles the forward; endQ
// says x ends quantized (and is dequantized before returning).
func (b *staticBuild) forward(endQ bool) error {
	b.body = nn.ForwardPreamble(b.spec, b.src.Prelude)
	inQ := false
	for i := range b.net.Layers {
		st := b.steps[i]
		if st.dequantizeIn {
			b.body = append(b.body, "x = x.dequantize()")
			inQ = false
		}
		if st.quantizeIn {
			inQ = true
			// 13 is torch.quint8's ScalarType.
			b.body = append(b.body, fmt.Sprintf("x = torch.quantize_per_tensor(x, %s, %d, 13)", tsFloat(b.scales[st.obsIn]), b.zps[st.obsIn]))
		}
		var err error
		switch {
		case st.skip:
			// A folded batchnorm, a fused ReLU, or dropout (the identity
			// in eval mode).
			continue
		case st.quantized:
			err = b.packed(i)
		default:
			err = b.copied(i, inQ)
		}
		if err != nil {
			return err
		}
	}
	if endQ {
		b.body = append(b.body, "x = x.dequantize()")
	}
	if err := defineForward(b.h, b.body, "x"); err != nil {
		return fmt.Errorf("kiln: optimize: compiling the static int8 forward: %w", err)
	}
	return nil
}

// packed writes quantized layer i: its int8 weights (with a following
// batchnorm folded in) packed for the engine, and a call of the quantized
// kernel (the _relu one when a ReLU fuses into it).
func (b *staticBuild) packed(i int) error {
	nh := b.net.Handle()
	li, l, st := b.net.Layers[i], b.spec.Layers[i], b.steps[i]
	var w, bias native.Tensor
	var release func()
	var err error
	if st.bn >= 0 {
		w, bias, release, err = foldBatchNorm(nh, li, l, b.net.Layers[st.bn], b.spec.Layers[st.bn])
	} else {
		w, bias, release, err = weightBias(nh, li, l)
	}
	if err != nil {
		return err
	}
	stride := l.Stride
	if stride == 0 {
		stride = 1
	}
	_, err = optimize.AddPackedInt8(b.h, li.Name+"_packed", li.Type, w, bias, !b.perTensor, stride, l.Padding)
	release()
	if err != nil {
		return fmt.Errorf("kiln: optimize: static int8 layer %s (%s engine): %w", li.Name, b.engine, err)
	}
	op := li.Type
	name := li.Name
	if st.bn >= 0 {
		name += "+" + b.net.Layers[st.bn].Name
	}
	if st.fused >= 0 {
		op += "_relu"
		name += "+" + b.net.Layers[st.fused].Name
	}
	b.qnames = append(b.qnames, name)
	b.body = append(b.body, fmt.Sprintf("x = quantized.%s(x, self.%s_packed, %s, %d)", op, li.Name, tsFloat(b.scales[st.obsOut]), b.zps[st.obsOut]))
	return nil
}

// copied writes layer i as it is, running on x quantized (inQ: a layer
// passQuantized allows) or in float: its tensors copied from the network
// and its float source.
func (b *staticBuild) copied(i int, inQ bool) error {
	li, l := b.net.Layers[i], b.spec.Layers[i]
	if inQ {
		b.qnames = append(b.qnames, li.Name)
	} else {
		b.fnames = append(b.fnames, li.Name)
	}
	for _, name := range nn.LayerTensors(li, l) {
		param := strings.HasSuffix(name, "_weight") || strings.HasSuffix(name, "_bias")
		if err := copyTensor(b.h, b.net.Handle(), name, nil, param); err != nil {
			return err
		}
	}
	b.body = append(b.body, nn.LayerSource(li, l)...)
	return nil
}

// foldable says whether bn (a layer after layer info) is a batchnorm that
// folds into info's weights: batchnorm2d after conv2d, batchnorm1d after
// conv1d or after a linear layer with flat outputs.
func foldable(info, bn nn.LayerInfo) bool {
	switch info.Type {
	case "conv2d":
		return bn.Type == "batchnorm2d"
	case "conv1d":
		return bn.Type == "batchnorm1d"
	case "linear":
		return bn.Type == "batchnorm1d" && len(info.Out) == 1
	}
	return false
}

// weightBias returns copies of layer li's weight and bias (the zero
// Tensor without one); release frees them.
func weightBias(h native.Module, li nn.LayerInfo, l nn.Layer) (w, b native.Tensor, release func(), err error) {
	if w, err = optimize.Get(h, li.Name+"_weight"); err != nil {
		return w, b, nil, fmt.Errorf("kiln: optimize: %w", err)
	}
	if nn.HasBias(l) {
		if b, err = optimize.Get(h, li.Name+"_bias"); err != nil {
			w.Free()
			return native.Tensor{}, native.Tensor{}, nil, fmt.Errorf("kiln: optimize: %w", err)
		}
	}
	return w, b, func() { w.Free(); b.Free() }, nil
}

// values returns a float32 copy of h's tensor attribute name.
func values(h native.Module, name string) ([]float32, []int64, error) {
	v, err := optimize.Get(h, name)
	if err != nil {
		return nil, nil, fmt.Errorf("kiln: optimize: %w", err)
	}
	t, err := core.AdoptTensor(v)
	if err != nil {
		return nil, nil, err
	}
	defer t.Close()
	d, err := core.CopyData[float32](t)
	return d, t.Shape(), err
}

// foldBatchNorm returns layer li's weight and bias with the eval-mode
// batchnorm bn that follows it folded in: per output channel c,
// w'_c = w_c·γ_c/√(var_c+ε) and b'_c = (b_c−mean_c)·γ_c/√(var_c+ε) + β_c.
// release frees them.
func foldBatchNorm(h native.Module, li nn.LayerInfo, l nn.Layer, bn nn.LayerInfo, bl nn.Layer) (native.Tensor, native.Tensor, func(), error) {
	w, shape, err := values(h, li.Name+"_weight")
	if err != nil {
		return native.Tensor{}, native.Tensor{}, nil, err
	}
	out := int(shape[0])
	b := make([]float32, out)
	if nn.HasBias(l) {
		if b, _, err = values(h, li.Name+"_bias"); err != nil {
			return native.Tensor{}, native.Tensor{}, nil, err
		}
	}
	var st [4][]float32
	for k, suffix := range []string{"_weight", "_bias", "_running_mean", "_running_var"} {
		if st[k], _, err = values(h, bn.Name+suffix); err != nil {
			return native.Tensor{}, native.Tensor{}, nil, err
		}
		if len(st[k]) != out {
			return native.Tensor{}, native.Tensor{}, nil, fmt.Errorf("kiln: optimize: folding %s into %s: %d channels, want %d", bn.Name, li.Name, len(st[k]), out)
		}
	}
	eps := bl.Eps
	if eps == 0 {
		eps = 1e-5
	}
	per := len(w) / out
	for c := range out {
		f := float64(st[0][c]) / math.Sqrt(float64(st[3][c])+eps)
		for k := range per {
			w[c*per+k] = float32(float64(w[c*per+k]) * f)
		}
		b[c] = float32((float64(b[c])-float64(st[2][c]))*f + float64(st[1][c]))
	}
	wt, err := core.NewTensor(w, shape...)
	if err != nil {
		return native.Tensor{}, native.Tensor{}, nil, err
	}
	bt, err := core.NewTensor(b, int64(out))
	if err != nil {
		wt.Close()
		return native.Tensor{}, native.Tensor{}, nil, err
	}
	return wt.Handle(), bt.Handle(), func() { wt.Close(); bt.Close() }, nil
}

// checkCalibration checks that cal holds rows of the model's raw inputs.
func checkCalibration(src *Source, cal *data.Dataset) error {
	if cal == nil || cal.Len() == 0 {
		return fmt.Errorf("kiln: optimize: static int8 needs calibration data: the calibration set is empty")
	}
	if want := int(src.Prelude.Inputs); cal.Features != want {
		return fmt.Errorf("kiln: optimize: the calibration set has %d columns per row, the model takes %d input columns", cal.Features, want)
	}
	if len(cal.X) != cal.Len()*cal.Features {
		return fmt.Errorf("kiln: optimize: the calibration set has %d values for %d rows of %d columns", len(cal.X), cal.Len(), cal.Features)
	}
	return nil
}

// Calibration encodes the rows of t as the model's raw inputs (its
// feature columns, by name, as the package's preprocessing encodes them)
// for static int8 calibration. The target column is not needed.
func (s *Source) Calibration(t *data.Table) (*data.Dataset, error) {
	if t == nil || t.Rows() == 0 {
		return nil, fmt.Errorf("kiln: optimize: the calibration data is empty (no rows)")
	}
	rows := make([]int, t.Rows())
	for i := range rows {
		rows[i] = i
	}
	pre := s.Manifest.Preprocessing
	x, err := pre.EncodeFeatures(t, rows)
	if err != nil {
		return nil, fmt.Errorf("kiln: optimize: calibration data: %w", err)
	}
	return data.NewDataset(x, pre.NumInputs(), make([]float32, len(rows)))
}
