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
		return fmt.Errorf("kiln: optimize: sparsity %v is outside [0, 1)", s)
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

// Norm is how structured pruning ranks neurons.
type Norm string

// Norms of a neuron's incoming weights (a row of a Linear weight).
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

// PruneStructured removes the fraction `amount` of output neurons (rows of
// the weight with the smallest L1 or L2 norm, bias included in neither)
// from every linear layer whose outputs feed, through elementwise layers
// only (activations, dropout, batchnorm1d), the next linear layer; the
// network's last linear layer, and ones feeding anything else, keep their
// size. It builds a new, smaller dense network: the next layer loses the
// matching input columns and a batchnorm1d in between the matching
// channels. A layernorm in between normalizes over all features, so
// removing some changes every output: that is an error. The caller
// closes the returned net; spec is its Spec.
func PruneStructured(src *Source, net *nn.Net, spec nn.Spec, amount float64, norm Norm) (*nn.Net, nn.Spec, error) {
	if err := checkSparsity(amount); err != nil {
		return nil, nn.Spec{}, err
	}
	if norm == "" {
		norm = L2
	}
	if norm != L1 && norm != L2 {
		return nil, nn.Spec{}, fmt.Errorf("kiln: optimize: unknown norm %q (want l1 or l2)", norm)
	}
	infos := net.Layers
	keep := map[int][]int64{}
	// next[i] is the linear layer fed by linear layer i through
	// elementwise layers; between[i] the layers in between.
	next := map[int]int{}
	for i, info := range infos {
		if info.Type != "linear" {
			continue
		}
		for j := i + 1; j < len(infos); j++ {
			t := infos[j].Type
			if t == "linear" {
				next[i] = j
				break
			}
			if t == "layernorm" {
				return nil, nn.Spec{}, fmt.Errorf("kiln: optimize: structured pruning of layer %s: the layernorm %s after it normalizes over all its outputs, so removing neurons would change the rest; prune without --structured",
					info.Name, infos[j].Name)
			}
			if !elementwise(t) {
				break
			}
		}
	}
	if len(next) == 0 {
		return nil, nn.Spec{}, fmt.Errorf("kiln: optimize: structured pruning needs a linear layer feeding another through activations only; this network has none")
	}
	h := net.Handle()
	for i := range next {
		info := infos[i]
		w, shape, err := getFloats(h, info.Name+"_weight")
		if err != nil {
			return nil, nn.Spec{}, err
		}
		out, in := int(shape[0]), int(shape[1])
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
		keep[i] = k
	}
	// The smaller spec: pruned layers' Out, and In left to inference
	// downstream.
	ns := spec
	ns.Layers = slices.Clone(spec.Layers)
	for i, k := range keep {
		ns.Layers[i].Out = int64(len(k))
		for j := i + 1; j <= next[i]; j++ {
			ns.Layers[j].In = 0
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
	// inKeep[j]: the input features layer j keeps (rows of the previous
	// pruned linear's outputs); nil keeps all.
	inKeep := map[int][]int64{}
	for i, k := range keep {
		for j := i + 1; j <= next[i]; j++ {
			inKeep[j] = k
		}
	}
	for j, info := range infos {
		for _, name := range nn.LayerTensors(info, spec.Layers[j]) {
			v, shape, err := getFloats(h, name)
			if err != nil {
				return nil, nn.Spec{}, err
			}
			if len(shape) == 0 {
				if err := setFloats(small.Handle(), name, v, shape); err != nil {
					return nil, nn.Spec{}, err
				}
				continue
			}
			// Rows: a pruned linear's outputs (weight rows, bias).
			if k, pruned := keep[j]; pruned {
				v, shape = takeRows(v, shape, k)
			}
			if k, ok := inKeep[j]; ok {
				if info.Type == "linear" && len(shape) == 2 {
					v, shape = takeCols(v, shape, k)
				} else if info.Type == "batchnorm1d" {
					v, shape = takeRows(v, shape, k)
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

// takeCols keeps the given columns of a 2-D v.
func takeCols(v []float32, shape []int64, cols []int64) ([]float32, []int64) {
	r, c := int(shape[0]), int(shape[1])
	out := make([]float32, 0, r*len(cols))
	for i := range r {
		for _, j := range cols {
			out = append(out, v[i*c+int(j)])
		}
	}
	return out, []int64{shape[0], int64(len(cols))}
}
