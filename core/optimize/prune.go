package optimize

import (
	"fmt"
	"math"
	"slices"
	"sort"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/optimize"
)

// checkSparsity rejects a pruning amount outside [0, 1).
func checkSparsity(s float64) error {
	if !(s >= 0 && s < 1) {
		return core.Errorf(core.InvalidArgument, "kiln: optimize: sparsity %v is outside [0, 1)", s)
	}
	return nil
}

// getFloats reads tensor attribute name of m as float32 values and shape.
func getFloats(m native.Module, name string) ([]float32, []int64, error) {
	h, err := optimize.Get(m, name)
	if err != nil {
		return nil, nil, fmt.Errorf("kiln: optimize: %w", err)
	}
	t, err := core.AdoptTensor(h)
	if err != nil {
		return nil, nil, err
	}
	defer t.Close()
	if t.DType() != core.Float32 {
		f, err := t.To(core.Float32)
		if err != nil {
			return nil, nil, err
		}
		defer f.Close()
		t = f
	}
	v, err := core.CopyData[float32](t)
	return v, t.Shape(), err
}

// setFloats writes v (of the attribute's shape) into tensor attribute name.
func setFloats(m native.Module, name string, v []float32, shape []int64) error {
	if shape == nil {
		shape = []int64{} // a scalar, not a vector of len(v)
	}
	t, err := core.NewTensor(v, shape...)
	if err != nil {
		return err
	}
	defer t.Close()
	if err := optimize.Set(m, name, t.Handle()); err != nil {
		return fmt.Errorf("kiln: optimize: %w", err)
	}
	return nil
}

// prunable reports whether a layer's weight is pruned by magnitude.
func prunable(typ string) bool {
	switch typ {
	case "linear", "conv1d", "conv2d":
		return true
	}
	return false
}

// Sparsity counts the zero elements of the weights of net's linear and
// conv layers.
func Sparsity(net *nn.Net, spec nn.Spec) (zeros, total int64, err error) {
	for _, info := range net.Layers {
		if !prunable(info.Type) {
			continue
		}
		w, _, err := getFloats(net.Handle(), info.Name+"_weight")
		if err != nil {
			return 0, 0, err
		}
		for _, x := range w {
			if x == 0 {
				zeros++
			}
		}
		total += int64(len(w))
	}
	return zeros, total, nil
}

// PruneUnstructured zeroes the smallest-magnitude weights of net's linear
// and conv layers (biases and normalization layers are kept): in each
// layer its own fraction `sparsity` of weights, or with global the
// fraction of all those weights under one threshold (so layers with many
// small weights lose more). It works in place and returns the sparsity
// reached over those weights.
func PruneUnstructured(net *nn.Net, sparsity float64, global bool) (float64, error) {
	if err := checkSparsity(sparsity); err != nil {
		return 0, err
	}
	type layer struct {
		name  string
		w     []float32
		shape []int64
	}
	var ls []layer
	var all []float32
	for _, info := range net.Layers {
		if !prunable(info.Type) {
			continue
		}
		w, shape, err := getFloats(net.Handle(), info.Name+"_weight")
		if err != nil {
			return 0, err
		}
		ls = append(ls, layer{info.Name + "_weight", w, shape})
		if global {
			for _, x := range w {
				all = append(all, float32(math.Abs(float64(x))))
			}
		}
	}
	if len(ls) == 0 {
		return 0, fmt.Errorf("kiln: optimize: the network has no linear or conv layers to prune")
	}
	// prune zeroes the k smallest |w| of w (ties broken by position, so
	// exactly k go).
	prune := func(w []float32, k int) {
		idx := make([]int, len(w))
		for i := range idx {
			idx[i] = i
		}
		sort.SliceStable(idx, func(a, b int) bool { return math.Abs(float64(w[idx[a]])) < math.Abs(float64(w[idx[b]])) })
		for _, i := range idx[:k] {
			w[i] = 0
		}
	}
	var zeros, total int
	if global {
		k := int(math.Round(sparsity * float64(len(all))))
		slices.Sort(all)
		var thr float32 = -1
		if k > 0 {
			thr = all[k-1]
		}
		// Everything strictly below the threshold goes; of the weights
		// equal to it, as many as needed to reach k, in layer order.
		below := 0
		for _, x := range all[:k] {
			if x < thr {
				below++
			}
		}
		atThr := k - below
		for _, l := range ls {
			for i, x := range l.w {
				a := float32(math.Abs(float64(x)))
				if a < thr || (a == thr && atThr > 0) {
					if a == thr {
						atThr--
					}
					l.w[i] = 0
				}
			}
		}
	} else {
		for _, l := range ls {
			prune(l.w, int(math.Round(sparsity*float64(len(l.w)))))
		}
	}
	for _, l := range ls {
		if err := setFloats(net.Handle(), l.name, l.w, l.shape); err != nil {
			return 0, err
		}
		for _, x := range l.w {
			if x == 0 {
				zeros++
			}
		}
		total += len(l.w)
	}
	return float64(zeros) / float64(total), nil
}

// Norm is how structured pruning ranks neurons and channels.
type Norm string

// Norms of a neuron's incoming weights (a row of a Linear weight) or of a
// conv filter (all weights of one output channel).
const (
	L1 Norm = "l1"
	L2 Norm = "l2"
)

// elementwise layers may sit between a pruned linear layer and the next
// one: they act on each feature alone.
func elementwise(typ string) bool {
	switch typ {
	case "relu", "gelu", "sigmoid", "tanh", "dropout", "batchnorm1d":
		return true
	}
	return false
}

// channelwise layers may sit between a pruned conv layer (of type conv)
// and the next conv or flatten: they act on each channel alone (a
// layernorm here normalizes the last, spatial, dimension of each
// channel).
func channelwise(conv, typ string) bool {
	switch typ {
	case "relu", "gelu", "sigmoid", "tanh", "dropout", "layernorm":
		return true
	case "batchnorm1d", "maxpool1d", "avgpool1d":
		return conv == "conv1d"
	case "batchnorm2d", "maxpool2d", "avgpool2d":
		return conv == "conv2d"
	}
	return false
}

// chain is a layer whose outputs structured pruning removes, and the
// layers that read them.
type chain struct {
	// producer is the pruned layer; consumer the linear or conv layer
	// reading its outputs, which loses the matching input columns or
	// channels.
	producer, consumer int
	// flatten is the index of a flatten between a conv producer and a
	// linear consumer (-1: none); block the features per channel after it.
	flatten int
	block   int64
}

// chains finds the layers structured pruning can shrink: a linear layer
// feeding the next linear layer through elementwise layers; a conv layer
// feeding the next conv of its kind through channelwise layers (activations,
// dropout, batchnorm, pooling), or, through a flatten, a linear layer. The
// network's last layer and layers feeding anything else keep their size.
func chains(infos []nn.LayerInfo) ([]chain, error) {
	var cs []chain
	for i, info := range infos {
		switch info.Type {
		case "linear":
			if len(info.Out) != 1 {
				continue // features are not the channel dimension
			}
			for j := i + 1; j < len(infos); j++ {
				t := infos[j].Type
				if t == "linear" {
					cs = append(cs, chain{producer: i, consumer: j, flatten: -1})
					break
				}
				if t == "layernorm" {
					return nil, fmt.Errorf("kiln: optimize: structured pruning of layer %s: the layernorm %s after it normalizes over all its outputs, so removing neurons would change the rest; prune without --structured",
						info.Name, infos[j].Name)
				}
				if !elementwise(t) {
					break
				}
			}
		case "conv1d", "conv2d":
			c := chain{producer: i, flatten: -1}
		walk:
			for j := i + 1; j < len(infos); j++ {
				t := infos[j].Type
				switch {
				case c.flatten < 0 && t == info.Type:
					c.consumer = j
					cs = append(cs, c)
					break walk
				case c.flatten < 0 && channelwise(info.Type, t):
				case c.flatten < 0 && t == "flatten":
					in := infos[j].In
					c.flatten, c.block = j, 1
					for _, d := range in[1:] {
						c.block *= d
					}
				case c.flatten >= 0 && t == "linear":
					c.consumer = j
					cs = append(cs, c)
					break walk
				case c.flatten >= 0 && t == "layernorm":
					return nil, fmt.Errorf("kiln: optimize: structured pruning of layer %s: the layernorm %s after it normalizes over all its flattened outputs, so removing channels would change the rest; prune without --structured",
						info.Name, infos[j].Name)
				case c.flatten >= 0 && elementwise(t):
				default:
					break walk
				}
			}
		}
	}
	return cs, nil
}

// StructuredKeep returns, for each layer structured pruning shrinks (by
// name), the indices of the output neurons or channels it keeps, in
// order: the round((1-amount)·n) (at least one) whose weight rows or
// filters have the largest L1 or L2 norm (bias not included).
func StructuredKeep(net *nn.Net, amount float64, norm Norm) (map[string][]int64, error) {
	if err := checkSparsity(amount); err != nil {
		return nil, err
	}
	if norm == "" {
		norm = L2
	}
	if norm != L1 && norm != L2 {
		return nil, fmt.Errorf("kiln: optimize: unknown norm %q (want l1 or l2)", norm)
	}
	cs, err := chains(net.Layers)
	if err != nil {
		return nil, err
	}
	if len(cs) == 0 {
		return nil, fmt.Errorf("kiln: optimize: structured pruning needs a linear layer feeding another through activations, or a conv layer feeding another conv or (through flatten) a linear layer; this network has none")
	}
	keep := map[string][]int64{}
	for _, c := range cs {
		info := net.Layers[c.producer]
		w, shape, err := getFloats(net.Handle(), info.Name+"_weight")
		if err != nil {
			return nil, err
		}
		out := int(shape[0])
		in := len(w) / out
		n := max(1, int(math.Round((1-amount)*float64(out))))
		score := make([]float64, out)
		for r := range out {
			for _, x := range w[r*in : (r+1)*in] {
				if norm == L1 {
					score[r] += math.Abs(float64(x))
				} else {
					score[r] += float64(x) * float64(x)
				}
			}
		}
		idx := make([]int64, out)
		for r := range idx {
			idx[r] = int64(r)
		}
		sort.SliceStable(idx, func(a, b int) bool { return score[idx[a]] > score[idx[b]] })
		k := idx[:n]
		slices.Sort(k)
		keep[info.Name] = k
	}
	return keep, nil
}

// PruneStructured removes the fraction `amount` of output neurons of
// linear layers and output channels of conv layers (those with the
// smallest L1 or L2 norm of their weights, see StructuredKeep) and builds
// a new, smaller dense network:
//
//   - a linear layer feeding the next linear layer through elementwise
//     layers (activations, dropout, batchnorm1d) loses weight rows and
//     bias entries; the next layer loses the matching input columns and a
//     batchnorm1d in between the matching features;
//   - a conv1d/conv2d layer feeding the next conv of its kind through
//     channelwise layers (activations, dropout, batchnorm, pooling,
//     layernorm over the spatial dimension) loses filters; a batchnorm in
//     between loses the matching channels and the next conv the matching
//     input channels;
//   - a conv feeding a linear layer through flatten (and elementwise
//     layers after it) loses filters, and the linear layer loses the
//     matching input columns: one channel-major block of H×W (or L)
//     columns per removed channel.
//
// The network's last linear layer, and layers feeding anything else, keep
// their size. A layernorm over the features removed is an error (removing
// some would change the others). Kiln's conv layers are not grouped, so
// every filter reads all input channels. The caller closes the returned
// net; spec is its Spec.
func PruneStructured(src *Source, net *nn.Net, spec nn.Spec, amount float64, norm Norm) (*nn.Net, nn.Spec, error) {
	keepByName, err := StructuredKeep(net, amount, norm)
	if err != nil {
		return nil, nn.Spec{}, err
	}
	infos := net.Layers
	cs, err := chains(infos)
	if err != nil {
		return nil, nn.Spec{}, err
	}
	// keep[i]: the outputs layer i keeps. inKeep[j]: the input features
	// (or channels) layer j keeps, for its per-channel tensors
	// (batchnorm) or its weight's second dimension (the consumer).
	keep := map[int][]int64{}
	inKeep := map[int][]int64{}
	ns := spec
	ns.Layers = slices.Clone(spec.Layers)
	for _, c := range cs {
		k := keepByName[infos[c.producer].Name]
		keep[c.producer] = k
		ns.Layers[c.producer].Out = int64(len(k))
		var flat []int64
		if c.flatten >= 0 {
			flat = make([]int64, 0, len(k)*int(c.block))
			for _, ch := range k {
				for s := range c.block {
					flat = append(flat, ch*c.block+s)
				}
			}
		}
		for j := c.producer + 1; j <= c.consumer; j++ {
			ns.Layers[j].In = 0
			if c.flatten >= 0 && j > c.flatten {
				inKeep[j] = flat
			} else {
				inKeep[j] = k
			}
		}
	}
	small, err := nn.BuildWithPrelude(ns, src.Prelude, src.Manifest.Lineage.Seed)
	if err != nil {
		return nil, nn.Spec{}, fmt.Errorf("kiln: optimize: building the pruned network: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			small.Close()
		}
	}()
	h := net.Handle()
	for j, info := range infos {
		for _, name := range nn.LayerTensors(info, spec.Layers[j]) {
			v, shape, err := getFloats(h, name)
			if err != nil {
				return nil, nn.Spec{}, err
			}
			if len(shape) > 0 {
				// Rows: a pruned layer's outputs (weight rows, filters,
				// bias).
				if k, pruned := keep[j]; pruned {
					v, shape = takeRows(v, shape, k)
				}
				if k, ok := inKeep[j]; ok {
					switch info.Type {
					case "linear", "conv1d", "conv2d":
						if name == info.Name+"_weight" {
							v, shape = takeDim1(v, shape, k)
						}
					case "batchnorm1d", "batchnorm2d":
						v, shape = takeRows(v, shape, k)
					}
				}
			}
			if err := setFloats(small.Handle(), name, v, shape); err != nil {
				return nil, nn.Spec{}, err
			}
		}
	}
	if err := small.SetTraining(false); err != nil {
		return nil, nn.Spec{}, err
	}
	ok = true
	return small, ns, nil
}

// takeRows keeps the given indices of v's first dimension.
func takeRows(v []float32, shape []int64, rows []int64) ([]float32, []int64) {
	inner := 1
	for _, d := range shape[1:] {
		inner *= int(d)
	}
	out := make([]float32, 0, len(rows)*inner)
	for _, r := range rows {
		out = append(out, v[int(r)*inner:int(r+1)*inner]...)
	}
	s := slices.Clone(shape)
	s[0] = int64(len(rows))
	return out, s
}

// takeDim1 keeps the given indices of v's second dimension: columns of
// a linear weight, input channels of a conv weight.
func takeDim1(v []float32, shape []int64, idx []int64) ([]float32, []int64) {
	outer, mid := int(shape[0]), int(shape[1])
	inner := 1
	for _, d := range shape[2:] {
		inner *= int(d)
	}
	out := make([]float32, 0, outer*len(idx)*inner)
	for i := range outer {
		for _, j := range idx {
			o := (i*mid + int(j)) * inner
			out = append(out, v[o:o+inner]...)
		}
	}
	s := slices.Clone(shape)
	s[1] = int64(len(idx))
	return out, s
}
