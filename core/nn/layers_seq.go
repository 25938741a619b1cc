package nn

import (
	"fmt"
	"math"
	"strings"

	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/trainer"
)

// Layers beyond feed-forward: residual blocks, multi-head self-attention,
// the Transformer encoder layer, LSTM and GRU, positional embeddings and
// global average pooling. Each follows its torch.nn namesake's arithmetic
// and parameter layout (so that weights copy across by name: a layer n's
// "<n>_self_attn_in_proj_weight" is TransformerEncoderLayer's
// "self_attn.in_proj_weight"), on Kiln's batch-first tensors: sequences
// are [batch, seq, features].

// maxDepth bounds how deeply residual blocks nest.
const maxDepth = 16

// seqDefaults are the defaulted settings of the sequence layers.
func ffDim(l Layer) int64 {
	if l.DimFeedforward == 0 {
		return 2048
	}
	return l.DimFeedforward
}

func numLayers(l Layer) int64 {
	if l.NumLayers == 0 {
		return 1
	}
	return l.NumLayers
}

func directions(l Layer) int64 {
	if l.Bidirectional {
		return 2
	}
	return 1
}

// checkSeqFields refuses sizes beyond the limits and non-finite dropout,
// before any arithmetic on them.
func checkSeqFields(l Layer) error {
	for _, f := range []struct {
		name string
		v    int64
	}{{"embed_dim", l.EmbedDim}, {"num_heads", l.NumHeads}, {"d_model", l.DModel}, {"nhead", l.NHead},
		{"dim_feedforward", l.DimFeedforward}, {"hidden_size", l.HiddenSize}, {"num_layers", l.NumLayers},
		{"max_len", l.MaxLen}} {
		if f.v > MaxSampleValues {
			return fmt.Errorf("%s=%d is larger than the limit %d", f.name, f.v, MaxSampleValues)
		}
		if f.v < 0 {
			return fmt.Errorf("%s must be >= 0, got %d", f.name, f.v)
		}
	}
	if l.NumLayers > 64 {
		return fmt.Errorf("num_layers=%d is more than 64", l.NumLayers)
	}
	if math.IsNaN(l.Dropout) || l.Dropout < 0 || l.Dropout >= 1 {
		return fmt.Errorf("dropout must be in [0, 1), got %v", l.Dropout)
	}
	if l.BatchFirst != nil && !*l.BatchFirst {
		return fmt.Errorf("batch_first must be true: Kiln's sequences are [batch, seq, features]")
	}
	return nil
}

// addParams adds a to total unless that passes MaxParams (-1).
func addParams(total int64, a ...int64) int64 {
	for _, v := range a {
		if v < 0 || total < 0 || v > MaxParams-total {
			return -1
		}
		total += v
	}
	return total
}

// mul is a*b, or -1 beyond MaxParams.
func mul(a ...int64) int64 {
	n := int64(1)
	for _, v := range a {
		if n = mulLimit(n, v, MaxParams); n < 0 {
			return -1
		}
	}
	return n
}

// inferSeq infers the layers of this file; ok is false for other types.
func inferSeq(t string, l Layer, in []int64) (out []int64, params int64, err error, ok bool) {
	out, params, err = inferSeqDepth(t, l, in, 0)
	return out, params, err, isSeq(t)
}

func isSeq(t string) bool {
	switch t {
	case "residual", "multiheadattention", "transformerencoderlayer", "lstm", "gru",
		"positionalembedding", "globalavgpool", "globalavgpool1d", "globalavgpool2d":
		return true
	}
	return false
}

func inferSeqDepth(t string, l Layer, in []int64, depth int) ([]int64, int64, error) {
	if !isSeq(t) {
		return nil, 0, nil
	}
	if err := checkSeqFields(l); err != nil {
		return nil, 0, err
	}
	if t != "residual" && len(l.Layers) > 0 {
		return nil, 0, fmt.Errorf("layers apply to residual blocks only")
	}
	switch t {
	case "residual":
		infos, proj, params, err := residualInfer(l, in, depth)
		if err != nil {
			return nil, 0, err
		}
		return infos[len(infos)-1].Out, addParams(params, proj), nil
	case "multiheadattention":
		e, err := seqDim(in, l.EmbedDim, "embed_dim")
		if err != nil {
			return nil, 0, err
		}
		if err := heads(e, l.NumHeads, "embed_dim", "num_heads"); err != nil {
			return nil, 0, err
		}
		return in, addParams(0, mul(4, e, e), 4*e), nil
	case "transformerencoderlayer":
		d, err := seqDim(in, l.DModel, "d_model")
		if err != nil {
			return nil, 0, err
		}
		if err := heads(d, l.NHead, "d_model", "nhead"); err != nil {
			return nil, 0, err
		}
		switch strings.ToLower(l.Activation) {
		case "", "relu", "gelu":
		default:
			return nil, 0, fmt.Errorf("activation must be relu or gelu, got %q", l.Activation)
		}
		if l.Eps < 0 {
			return nil, 0, fmt.Errorf("eps must be >= 0")
		}
		f := ffDim(l)
		return in, addParams(0, mul(4, d, d), 4*d, mul(2, d, f), f, d, 4*d), nil
	case "lstm", "gru":
		if len(in) != 2 {
			return nil, 0, fmt.Errorf("needs [seq, features] samples (set input_shape, or an embedding before it), got shape %v", in)
		}
		if err := needPositive("hidden_size", l.HiddenSize); err != nil {
			return nil, 0, err
		}
		switch l.Output {
		case "", "sequence", "last":
		default:
			return nil, 0, fmt.Errorf("output must be sequence or last, got %q", l.Output)
		}
		h, dirs, gates := l.HiddenSize, directions(l), int64(4)
		if t == "gru" {
			gates = 3
		}
		total := int64(0)
		f := in[1]
		for range numLayers(l) {
			per := addParams(0, mul(gates, h, f), mul(gates, h, h), mul(2, gates, h))
			total = addParams(total, mul(per, dirs))
			f = dirs * h
		}
		if mul(dirs, h) < 0 {
			return nil, 0, fmt.Errorf("hidden_size too large")
		}
		if l.Output == "last" {
			return []int64{dirs * h}, total, nil
		}
		return []int64{in[0], dirs * h}, total, nil
	case "positionalembedding":
		if len(in) != 2 {
			return nil, 0, fmt.Errorf("needs [seq, features] samples, got shape %v", in)
		}
		if l.MaxLen != 0 && l.MaxLen < in[0] {
			return nil, 0, fmt.Errorf("max_len=%d is shorter than the sequence (%d)", l.MaxLen, in[0])
		}
		switch strings.ToLower(l.Encoding) {
		case "", "learned":
			return in, mul(maxLen(l, in), in[1]), nil
		case "sinusoidal":
			return in, 0, nil
		}
		return nil, 0, fmt.Errorf("encoding must be learned or sinusoidal, got %q", l.Encoding)
	case "globalavgpool", "globalavgpool1d", "globalavgpool2d":
		want := map[string]int{"globalavgpool1d": 2, "globalavgpool2d": 3}[t]
		if want != 0 && len(in) != want {
			return nil, 0, fmt.Errorf("needs %d-D samples (channels first), got shape %v", want, in)
		}
		dims, err := poolDims(l, in)
		if err != nil {
			return nil, 0, err
		}
		var out []int64
		for i, d := range in {
			if !containsInt(dims, i) {
				out = append(out, d)
			}
		}
		if len(out) == 0 {
			out = []int64{1}
		}
		return out, 0, nil
	}
	return nil, 0, nil
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// poolDims are the sample dimensions global average pooling averages.
func poolDims(l Layer, in []int64) ([]int, error) {
	if l.Dim != nil {
		d := *l.Dim
		if d < 0 {
			d += len(in)
		}
		if d < 0 || d >= len(in) {
			return nil, fmt.Errorf("dim %d out of range for samples of shape %v", *l.Dim, in)
		}
		return []int{d}, nil
	}
	if len(in) < 2 {
		return nil, fmt.Errorf("needs samples with channels and positions ([C, L] or [C, H, W]), got shape %v", in)
	}
	var ds []int
	for i := 1; i < len(in); i++ {
		ds = append(ds, i)
	}
	return ds, nil
}

func maxLen(l Layer, in []int64) int64 {
	if l.MaxLen > 0 {
		return l.MaxLen
	}
	return in[0]
}

// seqDim checks that samples are [seq, features] and returns features,
// checked against want when given.
func seqDim(in []int64, want int64, name string) (int64, error) {
	if len(in) != 2 {
		return 0, fmt.Errorf("needs [seq, features] samples (set input_shape, or an embedding before it), got shape %v", in)
	}
	if want != 0 && want != in[1] {
		return 0, fmt.Errorf("%s=%d but its input has %d features (shape %v)", name, want, in[1], in)
	}
	return in[1], nil
}

func heads(e, h int64, ename, hname string) error {
	if err := needPositive(hname, h); err != nil {
		return err
	}
	if e%h != 0 {
		return fmt.Errorf("%s=%d is not divisible by %s=%d", ename, e, hname, h)
	}
	return nil
}

// residualInfer infers a residual block's body and returns its infos, the
// parameters of the projection of x (0: none) and the body's parameters.
func residualInfer(l Layer, in []int64, depth int) ([]LayerInfo, int64, int64, error) {
	if depth >= maxDepth {
		return nil, 0, 0, fmt.Errorf("residual blocks nest more than %d deep", maxDepth)
	}
	if len(l.Layers) == 0 {
		return nil, 0, 0, fmt.Errorf("a residual block needs layers")
	}
	if len(l.Layers) > MaxLayers {
		return nil, 0, 0, fmt.Errorf("a residual block has %d layers, more than the limit %d", len(l.Layers), MaxLayers)
	}
	shape := in
	var total int64
	names := map[string]int{}
	infos := make([]LayerInfo, 0, len(l.Layers))
	for i, c := range l.Layers {
		info := LayerInfo{Index: i, Name: c.Name, Type: kind(c.Type), In: shape}
		if info.Name == "" {
			info.Name = fmt.Sprintf("l%d", i)
		}
		if !ident.MatchString(info.Name) {
			return nil, 0, 0, fmt.Errorf("inner layer %d: name must be an identifier", i)
		}
		if j, dup := names[info.Name]; dup {
			return nil, 0, 0, fmt.Errorf("inner layer %d: name already used by inner layer %d", i, j)
		}
		names[info.Name] = i
		if err := checkSizes(c); err != nil {
			return nil, 0, 0, fmt.Errorf("inner layer %d (%s): %v", i, c.Type, err)
		}
		var out []int64
		var params int64
		var err error
		if info.Type == "residual" {
			var inner []LayerInfo
			var proj, body int64
			inner, proj, body, err = residualInfer(c, shape, depth+1)
			if err == nil {
				out, params = inner[len(inner)-1].Out, addParams(body, proj)
			}
		} else {
			out, params, err = infer(info.Type, c, shape)
		}
		if err != nil {
			return nil, 0, 0, fmt.Errorf("inner layer %d (%s %q): %v", i, c.Type, info.Name, err)
		}
		for _, d := range out {
			if d <= 0 {
				return nil, 0, 0, fmt.Errorf("inner layer %d: output shape %v is empty", i, out)
			}
		}
		if prod(out) < 0 {
			return nil, 0, 0, fmt.Errorf("inner layer %d: output shape %v holds more than %d values per sample", i, out, MaxSampleValues)
		}
		if total = addParams(total, params); total < 0 {
			return nil, 0, 0, fmt.Errorf("the block would have more than %d parameters", int64(MaxParams))
		}
		info.Out, info.Params = out, params
		infos = append(infos, info)
		shape = out
	}
	proj, err := projection(in, shape)
	if err != nil {
		return nil, 0, 0, err
	}
	return infos, proj.params, total, nil
}

// proj is how a residual block maps x to its body's output shape.
type proj struct {
	kind   string // "", "linear", "conv1d", "conv2d"
	in     int64
	out    int64
	stride int64
	params int64
}

// projection finds the projection from shape in to shape out: none when
// equal; a linear map of the last dimension when only that differs; a
// 1×1 convolution with stride when channels-first [C, L] or [C, H, W]
// samples change channels and/or shrink by an integer stride.
func projection(in, out []int64) (proj, error) {
	if equal(in, out) {
		return proj{}, nil
	}
	if len(in) == len(out) && equal(in[:len(in)-1], out[:len(out)-1]) {
		a, b := in[len(in)-1], out[len(out)-1]
		return proj{kind: "linear", in: a, out: b, params: addParams(mul(a, b), b)}, nil
	}
	if len(in) == len(out) && (len(in) == 2 || len(in) == 3) {
		s := in[1] / out[1]
		ok := s >= 1
		for i := 1; ok && i < len(in); i++ {
			ok = convOut(in[i], 1, s, 0) == out[i]
		}
		if ok {
			k := map[int]string{2: "conv1d", 3: "conv2d"}[len(in)]
			return proj{kind: k, in: in[0], out: out[0], stride: s, params: addParams(mul(in[0], out[0]), out[0])}, nil
		}
	}
	return proj{}, fmt.Errorf("the block maps %v to %v, which no linear or 1x1-convolution projection of its input matches", in, out)
}

func equal(a, b []int64) bool {
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

// uniform is U(-bound, bound), PyTorch's default for Linear and RNN weights.
func uniform(name string, shape []int64, bound float64) param {
	return param{name: name, shape: shape, init: trainer.InitUniform, a: -bound, b: bound, dt: native.Float32, learn: true}
}

func zeros(name string, shape []int64) param {
	return param{name: name, shape: shape, init: trainer.InitZeros, dt: native.Float32, learn: true}
}

func ones(name string, shape []int64) param {
	return param{name: name, shape: shape, init: trainer.InitOnes, dt: native.Float32, learn: true}
}

// seqCode generates the layers of this file; ok is false for other types.
func seqCode(info LayerInfo, l Layer) ([]string, []param, bool) {
	if !isSeq(info.Type) {
		return nil, nil, false
	}
	n, in := info.Name, info.In
	eps := l.Eps
	if eps == 0 {
		eps = 1e-5
	}
	switch info.Type {
	case "residual":
		infos, _, _, err := residualInfer(l, in, 0)
		if err != nil {
			panic("nn: residual passed inference but not now: " + err.Error())
		}
		code := []string{fmt.Sprintf("%s_identity = x", n)}
		var ps []param
		for i, c := range infos {
			c.Name = n + "_" + c.Name
			cc, cp := layerCode(c, l.Layers[i])
			code = append(code, cc...)
			ps = append(ps, cp...)
		}
		p, _ := projection(in, infos[len(infos)-1].Out)
		id := n + "_identity"
		w, b := "self."+n+"_proj_weight", "self."+n+"_proj_bias"
		switch p.kind {
		case "linear":
			bound := 1 / math.Sqrt(float64(p.in))
			ps = append(ps, uniform(n+"_proj_weight", []int64{p.out, p.in}, bound), uniform(n+"_proj_bias", []int64{p.out}, bound))
			id = fmt.Sprintf("torch.linear(%s, %s, %s)", id, w, b)
		case "conv1d", "conv2d":
			bound := 1 / math.Sqrt(float64(p.in))
			shape := []int64{p.out, p.in, 1}
			st := fmt.Sprintf("[%d]", p.stride)
			zero, one := "[0]", "[1]"
			if p.kind == "conv2d" {
				shape = append(shape, 1)
				st = fmt.Sprintf("[%d, %d]", p.stride, p.stride)
				zero, one = "[0, 0]", "[1, 1]"
			}
			ps = append(ps, uniform(n+"_proj_weight", shape, bound), uniform(n+"_proj_bias", []int64{p.out}, bound))
			id = fmt.Sprintf("torch.%s(%s, %s, %s, %s, %s, %s, 1)", p.kind, id, w, b, st, zero, one)
		}
		code = append(code, fmt.Sprintf("x = x + %s", id))
		return code, ps, true
	case "multiheadattention":
		e := in[1]
		code, ps := attention(n, e, l.NumHeads, l.Dropout, "x", "x")
		return code, ps, true
	case "transformerencoderlayer":
		code, ps := encoderLayer(n, in[1], l, eps)
		return code, ps, true
	case "lstm", "gru":
		return rnn(info, l)
	case "positionalembedding":
		t, d := in[0], in[1]
		if strings.ToLower(l.Encoding) == "sinusoidal" {
			pe := make([]float32, t*d)
			for pos := range t {
				for i := int64(0); i < d; i++ {
					k := float64(i - i%2)
					a := float64(pos) / math.Pow(10000, k/float64(d))
					if i%2 == 0 {
						pe[pos*d+i] = float32(math.Sin(a))
					} else {
						pe[pos*d+i] = float32(math.Cos(a))
					}
				}
			}
			return []string{fmt.Sprintf("x = x + self.%s_pe", n)},
				[]param{{name: n + "_pe", shape: []int64{t, d}, dt: native.Float32, values: pe}}, true
		}
		ml := maxLen(l, in)
		ps := []param{{name: n + "_weight", shape: []int64{ml, d}, init: trainer.InitNormal, a: 0, b: 0.02, dt: native.Float32, learn: true}}
		if ml == t {
			return []string{fmt.Sprintf("x = x + self.%s_weight", n)}, ps, true
		}
		return []string{fmt.Sprintf("x = x + self.%s_weight[:%d]", n, t)}, ps, true
	case "globalavgpool", "globalavgpool1d", "globalavgpool2d":
		dims, _ := poolDims(l, in)
		var ds []string
		for _, d := range dims {
			ds = append(ds, fmt.Sprint(d+1)) // after the batch dimension
		}
		code := []string{fmt.Sprintf("x = torch.mean(x, [%s])", strings.Join(ds, ", "))}
		if len(dims) == len(in) {
			code = append(code, "x = x.reshape([-1, 1])")
		}
		return code, nil, true
	}
	return nil, nil, false
}

// attention is torch.nn.MultiheadAttention's self-attention (query = key =
// value = src, no mask) on batch-first [batch, seq, e] src, its result
// assigned to dst, with the parameters <n>_in_proj_weight,
// <n>_in_proj_bias, <n>_out_proj_weight, <n>_out_proj_bias initialized as
// torch does (xavier_uniform in-projection, zero biases).
func attention(n string, e, h int64, p float64, src, dst string) ([]string, []param) {
	hd := e / h
	xav := math.Sqrt(6 / float64(e+3*e))
	ps := []param{
		uniform(n+"_in_proj_weight", []int64{3 * e, e}, xav),
		zeros(n+"_in_proj_bias", []int64{3 * e}),
		uniform(n+"_out_proj_weight", []int64{e, e}, 1/math.Sqrt(float64(e))),
		zeros(n+"_out_proj_bias", []int64{e}),
	}
	v := n + "_"
	code := []string{
		fmt.Sprintf("%sqkv = torch.linear(%s, self.%sin_proj_weight, self.%sin_proj_bias)", v, src, v, v),
		fmt.Sprintf("%sb = %s.size(0)", v, src),
		fmt.Sprintf("%st = %s.size(1)", v, src),
		fmt.Sprintf("%sq = %sqkv[:, :, 0:%d].reshape([%sb, %st, %d, %d]).transpose(1, 2) * %s", v, v, e, v, v, h, hd, f(1/math.Sqrt(float64(hd)))),
		fmt.Sprintf("%sk = %sqkv[:, :, %d:%d].reshape([%sb, %st, %d, %d]).transpose(1, 2)", v, v, e, 2*e, v, v, h, hd),
		fmt.Sprintf("%sv = %sqkv[:, :, %d:%d].reshape([%sb, %st, %d, %d]).transpose(1, 2)", v, v, 2*e, 3*e, v, v, h, hd),
		fmt.Sprintf("%sa = torch.softmax(torch.matmul(%sq, %sk.transpose(-2, -1)), -1)", v, v, v),
		fmt.Sprintf("%sa = torch.dropout(%sa, %s, self.training)", v, v, f(p)),
		fmt.Sprintf("%so = torch.matmul(%sa, %sv).transpose(1, 2).reshape([%sb, %st, %d])", v, v, v, v, v, e),
		fmt.Sprintf("%s = torch.linear(%so, self.%sout_proj_weight, self.%sout_proj_bias)", dst, v, v, v),
	}
	return code, ps
}

// encoderLayer is torch.nn.TransformerEncoderLayer (batch_first=True, no
// masks): post-norm x = norm1(x + sa(x)); x = norm2(x + ff(x)), or
// pre-norm (norm_first) x = x + sa(norm1(x)); x = x + ff(norm2(x)), where
// sa is self-attention then dropout and ff is linear2(dropout(act(linear1)))
// then dropout. Parameter names mirror torch's with "_" for ".":
// <n>_self_attn_in_proj_weight, <n>_linear1_weight, <n>_norm1_weight, ...
func encoderLayer(n string, d int64, l Layer, eps float64) ([]string, []param) {
	fdim := ffDim(l)
	act := "relu"
	if strings.ToLower(l.Activation) == "gelu" {
		act = "gelu"
	}
	p := f(l.Dropout)
	v := n + "_"
	attnCode, ps := attention(n+"_self_attn", d, l.NHead, l.Dropout, v+"h", v+"h")
	b1, b2 := 1/math.Sqrt(float64(d)), 1/math.Sqrt(float64(fdim))
	ps = append(ps,
		uniform(v+"linear1_weight", []int64{fdim, d}, b1), uniform(v+"linear1_bias", []int64{fdim}, b1),
		uniform(v+"linear2_weight", []int64{d, fdim}, b2), uniform(v+"linear2_bias", []int64{d}, b2),
		ones(v+"norm1_weight", []int64{d}), zeros(v+"norm1_bias", []int64{d}),
		ones(v+"norm2_weight", []int64{d}), zeros(v+"norm2_bias", []int64{d}),
	)
	norm := func(k, src string) string {
		return fmt.Sprintf("torch.layer_norm(%s, [%d], self.%snorm%s_weight, self.%snorm%s_bias, %s, False)", src, d, v, k, v, k, f(eps))
	}
	ff := []string{
		fmt.Sprintf("%sh = torch.linear(%sh, self.%slinear1_weight, self.%slinear1_bias)", v, v, v, v),
		fmt.Sprintf("%sh = torch.dropout(torch.%s(%sh), %s, self.training)", v, act, v, p),
		fmt.Sprintf("%sh = torch.dropout(torch.linear(%sh, self.%slinear2_weight, self.%slinear2_bias), %s, self.training)", v, v, v, v, p),
	}
	var code []string
	if l.NormFirst {
		code = append(code, fmt.Sprintf("%sh = %s", v, norm("1", "x")))
		code = append(code, attnCode...)
		code = append(code, fmt.Sprintf("x = x + torch.dropout(%sh, %s, self.training)", v, p))
		code = append(code, fmt.Sprintf("%sh = %s", v, norm("2", "x")))
		code = append(code, ff...)
		code = append(code, fmt.Sprintf("x = x + %sh", v))
		return code, ps
	}
	code = append(code, fmt.Sprintf("%sh = x", v))
	code = append(code, attnCode...)
	code = append(code, fmt.Sprintf("x = %s", norm("1", fmt.Sprintf("x + torch.dropout(%sh, %s, self.training)", v, p))))
	code = append(code, fmt.Sprintf("%sh = x", v))
	code = append(code, ff...)
	code = append(code, fmt.Sprintf("x = %s", norm("2", fmt.Sprintf("x + %sh", v))))
	return code, ps
}

// rnn is torch.nn.LSTM / torch.nn.GRU (batch_first=True, zero initial
// state) through aten's lstm/gru ops, with torch's parameter names
// (<n>_weight_ih_l0, <n>_weight_hh_l0, <n>_bias_ih_l0, <n>_bias_hh_l0,
// ..._reverse) and initialization U(-1/sqrt(hidden), 1/sqrt(hidden)).
func rnn(info LayerInfo, l Layer) ([]string, []param, bool) {
	n, in := info.Name, info.In
	h, dirs, layers := l.HiddenSize, directions(l), numLayers(l)
	gates := int64(4)
	if info.Type == "gru" {
		gates = 3
	}
	bound := 1 / math.Sqrt(float64(h))
	var ps []param
	var refs []string
	f0 := in[1]
	for k := range layers {
		for d := range dirs {
			sfx := fmt.Sprintf("_l%d", k)
			if d == 1 {
				sfx += "_reverse"
			}
			for _, t := range []struct {
				name  string
				shape []int64
			}{
				{"weight_ih", []int64{gates * h, f0}}, {"weight_hh", []int64{gates * h, h}},
				{"bias_ih", []int64{gates * h}}, {"bias_hh", []int64{gates * h}},
			} {
				name := n + "_" + t.name + sfx
				ps = append(ps, uniform(name, t.shape, bound))
				refs = append(refs, "self."+name)
			}
		}
		f0 = dirs * h
	}
	v := n + "_"
	bi := "False"
	if dirs == 2 {
		bi = "True"
	}
	code := []string{
		fmt.Sprintf("%sh0 = torch.zeros([%d, x.size(0), %d], dtype=x.dtype, device=x.device)", v, layers*dirs, h),
	}
	params := "[" + strings.Join(refs, ", ") + "]"
	if info.Type == "lstm" {
		code = append(code, fmt.Sprintf("%sr = torch.lstm(x, [%sh0, %sh0], %s, True, %d, %s, self.training, %s, True)",
			v, v, v, params, layers, f(l.Dropout), bi))
	} else {
		code = append(code, fmt.Sprintf("%sr = torch.gru(x, %sh0, %s, True, %d, %s, self.training, %s, True)",
			v, v, params, layers, f(l.Dropout), bi))
	}
	if l.Output == "last" {
		// h_n is [layers*dirs, batch, hidden]: the last layer's states.
		code = append(code, fmt.Sprintf("x = %sr[1][%d:].transpose(0, 1).reshape([-1, %d])", v, (layers-1)*dirs, dirs*h))
	} else {
		code = append(code, fmt.Sprintf("x = %sr[0]", v))
	}
	return code, ps, true
}
