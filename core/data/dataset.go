package data

import (
	"errors"
	"fmt"
	"iter"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/kilnml/kiln/core"
)

// SplitOptions configures Split.
type SplitOptions struct {
	// Val and Test are the fractions of rows held out for validation and
	// test; the rest train. Each in [0, 1), summing below 1.
	Val  float64 `json:"val"`
	Test float64 `json:"test"`
	// Stratify keeps each class's share equal across the splits
	// (classification only).
	Stratify bool `json:"stratify,omitempty"`
}

// Split divides rows 0..n-1 into train, validation and test rows with a
// seeded shuffle; with classes (one per row) and o.Stratify, per class.
// Each split is returned in ascending row order.
func Split(n int, classes []int, o SplitOptions, seed uint64) (train, val, test []int, err error) {
	if n == 0 {
		return nil, nil, nil, errors.New("kiln: the data set is empty (no rows)")
	}
	if o.Val < 0 || o.Test < 0 || o.Val+o.Test >= 1 || math.IsNaN(o.Val+o.Test) {
		return nil, nil, nil, fmt.Errorf("kiln: split fractions val=%v test=%v must be >= 0 and sum below 1", o.Val, o.Test)
	}
	rng := rand.New(rand.NewPCG(seed, 0x6b696c6e))
	groups := [][]int{}
	if o.Stratify && classes != nil {
		if len(classes) != n {
			return nil, nil, nil, fmt.Errorf("kiln: %d class labels for %d rows", len(classes), n)
		}
		byClass := map[int][]int{}
		keys := []int{}
		for i, c := range classes {
			if _, ok := byClass[c]; !ok {
				keys = append(keys, c)
			}
			byClass[c] = append(byClass[c], i)
		}
		slices.Sort(keys)
		for _, k := range keys {
			groups = append(groups, byClass[k])
		}
	} else {
		all := make([]int, n)
		for i := range all {
			all[i] = i
		}
		groups = append(groups, all)
	}
	for _, g := range groups {
		rng.Shuffle(len(g), func(i, j int) { g[i], g[j] = g[j], g[i] })
		nt := int(math.Round(o.Test * float64(len(g))))
		nv := int(math.Round(o.Val * float64(len(g))))
		if nt+nv > len(g) {
			nv = len(g) - nt
		}
		test = append(test, g[:nt]...)
		val = append(val, g[nt:nt+nv]...)
		train = append(train, g[nt+nv:]...)
	}
	if len(train) == 0 {
		return nil, nil, nil, fmt.Errorf("kiln: no training rows left after holding out val=%v test=%v of %d rows", o.Val, o.Test, n)
	}
	slices.Sort(train)
	slices.Sort(val)
	slices.Sort(test)
	return train, val, test, nil
}

// Dataset is an in-memory set of samples: float32 features, row-major, and
// one float32 target per sample (a class index for classification).
type Dataset struct {
	X        []float32
	Y        []float32
	Features int
}

// NewDataset checks that x holds len(y) rows of `features` values.
func NewDataset(x []float32, features int, y []float32) (*Dataset, error) {
	if len(y) == 0 {
		return nil, errors.New("kiln: the data set is empty (no rows)")
	}
	if features <= 0 || len(x) != len(y)*features {
		return nil, fmt.Errorf("kiln: %d feature values for %d rows of %d features", len(x), len(y), features)
	}
	return &Dataset{X: x, Y: y, Features: features}, nil
}

// Len returns the number of samples.
func (d *Dataset) Len() int { return len(d.Y) }

// Subset copies the given rows into a new Dataset.
func (d *Dataset) Subset(rows []int) *Dataset {
	s := &Dataset{X: make([]float32, 0, len(rows)*d.Features), Y: make([]float32, 0, len(rows)), Features: d.Features}
	for _, r := range rows {
		s.X = append(s.X, d.X[r*d.Features:(r+1)*d.Features]...)
		s.Y = append(s.Y, d.Y[r])
	}
	return s
}

// Tensors copies the samples into libtorch: x [N, Features] and y [N],
// both float32. The caller closes both.
func (d *Dataset) Tensors() (x, y *core.Tensor, err error) {
	if x, err = core.NewTensor(d.X, int64(d.Len()), int64(d.Features)); err != nil {
		return nil, nil, err
	}
	if y, err = core.NewTensor(d.Y, int64(d.Len())); err != nil {
		x.Close()
		return nil, nil, err
	}
	return x, y, nil
}

// Shuffle returns a permutation of the sample indices drawn from rng: the
// order of one epoch.
func (d *Dataset) Shuffle(rng *rand.Rand) []int64 {
	p := make([]int64, d.Len())
	for i := range p {
		p[i] = int64(i)
	}
	rng.Shuffle(len(p), func(i, j int) { p[i], p[j] = p[j], p[i] })
	return p
}

// Batch is a batch of samples copied into tensors; the consumer closes X
// and Y.
type Batch struct {
	Rows []int64
	X, Y *core.Tensor
}

// Batches iterates over order (sample indices, e.g. from Shuffle) in
// batches of size samples (the last may be smaller).
func (d *Dataset) Batches(order []int64, size int) iter.Seq2[Batch, error] {
	return func(yield func(Batch, error) bool) {
		if size <= 0 {
			yield(Batch{}, fmt.Errorf("kiln: batch size must be > 0, got %d", size))
			return
		}
		for s := 0; s < len(order); s += size {
			rows := order[s:min(s+size, len(order))]
			xs := make([]float32, 0, len(rows)*d.Features)
			ys := make([]float32, 0, len(rows))
			for _, r := range rows {
				if r < 0 || int(r) >= d.Len() {
					yield(Batch{}, fmt.Errorf("kiln: sample index %d outside [0, %d)", r, d.Len()))
					return
				}
				xs = append(xs, d.X[int(r)*d.Features:(int(r)+1)*d.Features]...)
				ys = append(ys, d.Y[r])
			}
			x, err := core.NewTensor(xs, int64(len(rows)), int64(d.Features))
			if err != nil {
				yield(Batch{}, err)
				return
			}
			y, err := core.NewTensor(ys, int64(len(rows)))
			if err != nil {
				x.Close()
				yield(Batch{}, err)
				return
			}
			if !yield(Batch{Rows: rows, X: x, Y: y}, nil) {
				return
			}
		}
	}
}
