package data

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/kilnml/kiln/core/nn"
)

// Task is what a model predicts.
type Task string

// Tasks.
const (
	Classification Task = "classification"
	Regression     Task = "regression"
)

// Options configures preprocessing. Zero values mean: every column but the
// target is a feature, no imputation (a missing value is an error),
// standardization, task inferred from the target.
type Options struct {
	// Target is the column to predict (required).
	Target string `json:"target,omitempty"`
	// Task is classification or regression; empty infers it: a
	// categorical target, or one of at most 20 distinct integers, is a
	// class label.
	Task Task `json:"task,omitempty"`
	// Features lists the input columns in order; empty means all but the
	// target.
	Features []string `json:"features,omitempty"`
	// Categorical lists numeric columns to one-hot encode anyway
	// (categorical text columns always are).
	Categorical []string `json:"categorical,omitempty"`
	// Impute fills missing numeric values: "mean", "median", "constant"
	// (with ImputeValue) or "" for none. Missing categorical values are
	// always allowed and encode as all-zero one-hot rows.
	Impute      string  `json:"impute,omitempty"`
	ImputeValue float64 `json:"impute_value,omitempty"`
	// Scale is "standard" (default), "minmax" or "none".
	Scale string `json:"scale,omitempty"`
}

// FeatureInfo describes one raw input column of a fitted Preprocessor.
type FeatureInfo struct {
	Name string `json:"name"`
	// Categorical columns are fed as the index of their category in
	// Categories (NaN or any other number for an unknown or missing one)
	// and one-hot encoded inside the model.
	Categorical bool     `json:"categorical,omitempty"`
	Categories  []string `json:"categories,omitempty"`
	// Fill replaces a missing value (numeric columns with imputation).
	Fill *float64 `json:"fill,omitempty"`
	// Shift and Scale standardize: (x - Shift) / Scale.
	Shift float64 `json:"shift"`
	Scale float64 `json:"scale"`
}

// Preprocessor is preprocessing fitted on a training split.
type Preprocessor struct {
	Options  Options       `json:"options"`
	Task     Task          `json:"task"`
	Features []FeatureInfo `json:"features"`
	// Labels are the class names, in class-index order (classification).
	Labels []string `json:"labels,omitempty"`
}

// Fit fits preprocessing on the given training rows of t. Errors name the
// column at fault.
func Fit(t *Table, rows []int, o Options) (*Preprocessor, error) {
	if t.Rows() == 0 {
		return nil, fmt.Errorf("kiln: the data set is empty (no rows)")
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("kiln: no training rows to fit preprocessing on")
	}
	if o.Target == "" {
		return nil, fmt.Errorf("kiln: no target column given")
	}
	target, err := t.Lookup(o.Target, "target column")
	if err != nil {
		return nil, err
	}
	switch o.Impute {
	case "", "mean", "median", "constant":
	default:
		return nil, fmt.Errorf("kiln: unknown imputation %q (want mean, median or constant)", o.Impute)
	}
	switch o.Scale {
	case "", "standard", "minmax", "none":
	default:
		return nil, fmt.Errorf("kiln: unknown scaling %q (want standard, minmax or none)", o.Scale)
	}
	p := &Preprocessor{Options: o}
	names := o.Features
	if len(names) == 0 {
		for _, c := range t.Columns {
			if c.Name != o.Target {
				names = append(names, c.Name)
			}
		}
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("kiln: no feature columns besides the target %q", o.Target)
	}
	for _, n := range o.Categorical {
		if !slices.Contains(names, n) {
			return nil, fmt.Errorf("kiln: categorical column %q is not a feature column", n)
		}
	}
	for _, n := range names {
		if n == o.Target {
			return nil, fmt.Errorf("kiln: column %q is both the target and a feature", n)
		}
		c, err := t.Lookup(n, "feature column")
		if err != nil {
			return nil, err
		}
		fi, err := fitFeature(c, rows, o, slices.Contains(o.Categorical, n))
		if err != nil {
			return nil, err
		}
		p.Features = append(p.Features, fi)
	}
	if err := p.fitTarget(target, rows); err != nil {
		return nil, err
	}
	return p, nil
}

func fitFeature(c *Column, rows []int, o Options, forceCat bool) (FeatureInfo, error) {
	fi := FeatureInfo{Name: c.Name, Scale: 1}
	if c.Categorical || forceCat {
		fi.Categorical = true
		seen := map[string]bool{}
		for _, r := range rows {
			if c.Missing(r) {
				continue
			}
			seen[cellString(c, r)] = true
		}
		for k := range seen {
			fi.Categories = append(fi.Categories, k)
		}
		sortLabels(fi.Categories)
		if len(fi.Categories) == 0 {
			return fi, fmt.Errorf("kiln: column %q has no values in the training rows", c.Name)
		}
		return fi, nil
	}
	vals := make([]float64, 0, len(rows))
	missing, first := 0, -1
	for _, r := range rows {
		if math.IsNaN(c.Num[r]) {
			if first < 0 {
				first = r
			}
			missing++
			continue
		}
		vals = append(vals, c.Num[r])
	}
	if missing > 0 && o.Impute == "" {
		return fi, fmt.Errorf("kiln: column %q has %d missing (NaN) values (first in data row %d) and no imputation is configured; set impute to mean, median or constant",
			c.Name, missing, first+1)
	}
	if len(vals) == 0 && o.Impute != "constant" {
		return fi, fmt.Errorf("kiln: column %q has no values in the training rows", c.Name)
	}
	if o.Impute != "" {
		var fill float64
		switch o.Impute {
		case "mean":
			fill = mean(vals)
		case "median":
			fill = median(vals)
		case "constant":
			fill = o.ImputeValue
		}
		fi.Fill = &fill
		for ; missing > 0; missing-- {
			vals = append(vals, fill)
		}
	}
	switch o.Scale {
	case "", "standard":
		m := mean(vals)
		v := 0.0
		for _, x := range vals {
			v += (x - m) * (x - m)
		}
		sd := math.Sqrt(v / float64(len(vals)))
		fi.Shift = m
		if sd > 0 {
			fi.Scale = sd
		}
	case "minmax":
		lo, hi := slices.Min(vals), slices.Max(vals)
		fi.Shift = lo
		if hi > lo {
			fi.Scale = hi - lo
		}
	}
	return fi, nil
}

func mean(v []float64) float64 {
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// cellString is a cell as a category name.
func cellString(c *Column, r int) string {
	if c.Categorical {
		return c.Str[r]
	}
	return strconv.FormatFloat(c.Num[r], 'g', -1, 64)
}

// sortLabels sorts numerically when every label is a number, else as text.
func sortLabels(s []string) {
	numeric := true
	for _, x := range s {
		if _, err := strconv.ParseFloat(x, 64); err != nil {
			numeric = false
			break
		}
	}
	if numeric {
		sort.Slice(s, func(i, j int) bool {
			a, _ := strconv.ParseFloat(s[i], 64)
			b, _ := strconv.ParseFloat(s[j], 64)
			return a < b
		})
		return
	}
	sort.Strings(s)
}

func (p *Preprocessor) fitTarget(c *Column, rows []int) error {
	task := p.Options.Task
	if task == "" {
		task = Regression
		if c.Categorical {
			task = Classification
		} else {
			distinct := map[float64]bool{}
			integral := true
			for _, r := range rows {
				v := c.Num[r]
				if !math.IsNaN(v) {
					distinct[v] = true
					integral = integral && v == math.Trunc(v)
				}
			}
			if integral && len(distinct) <= 20 {
				task = Classification
			}
		}
	}
	p.Task = task
	switch task {
	case Classification:
		seen := map[string]bool{}
		for _, r := range rows {
			if !c.Missing(r) {
				seen[cellString(c, r)] = true
			}
		}
		for k := range seen {
			p.Labels = append(p.Labels, k)
		}
		sortLabels(p.Labels)
		if len(p.Labels) < 2 {
			return fmt.Errorf("kiln: target column %q has %d distinct class(es) in the training rows; classification needs 2 or more", c.Name, len(p.Labels))
		}
	case Regression:
		if c.Categorical {
			return fmt.Errorf("kiln: target column %q is not numeric, so it cannot be a regression target", c.Name)
		}
	default:
		return fmt.Errorf("kiln: unknown task %q (want classification or regression)", task)
	}
	return nil
}

// NumInputs is the number of raw columns the model takes.
func (p *Preprocessor) NumInputs() int { return len(p.Features) }

// NumFeatures is the number of features the network sees after
// preprocessing (one per numeric column, one per category).
func (p *Preprocessor) NumFeatures() int {
	n := 0
	for _, f := range p.Features {
		if f.Categorical {
			n += len(f.Categories)
		} else {
			n++
		}
	}
	return n
}

// EncodeFeatures returns the raw model input for the given rows of t,
// row-major [len(rows), NumInputs]: numeric values as they are (NaN for
// missing), categorical ones as category indices (NaN when unknown).
// Without imputation a missing numeric value is an error naming the column.
func (p *Preprocessor) EncodeFeatures(t *Table, rows []int) ([]float32, error) {
	n := len(p.Features)
	out := make([]float32, len(rows)*n)
	for j, f := range p.Features {
		c, err := t.Column(f.Name)
		if err != nil {
			return nil, err
		}
		if f.Categorical {
			idx := make(map[string]int, len(f.Categories))
			for k, s := range f.Categories {
				idx[s] = k
			}
			for i, r := range rows {
				v := float32(math.NaN())
				if !c.Missing(r) {
					if k, ok := idx[cellString(c, r)]; ok {
						v = float32(k)
					}
				}
				out[i*n+j] = v
			}
			continue
		}
		if c.Categorical {
			return nil, fmt.Errorf("kiln: column %q was numeric when preprocessing was fitted but holds text here", f.Name)
		}
		for i, r := range rows {
			v := c.Num[r]
			if math.IsNaN(v) && f.Fill == nil {
				return nil, fmt.Errorf("kiln: column %q has a missing (NaN) value in data row %d and no imputation is configured", f.Name, r+1)
			}
			out[i*n+j] = float32(v)
		}
	}
	return out, nil
}

// EncodeTarget returns the target of the given rows: class indices (as
// float32) for classification, values for regression. A missing or unseen
// label is an error naming the column and row.
func (p *Preprocessor) EncodeTarget(t *Table, rows []int) ([]float32, error) {
	c, err := t.Lookup(p.Options.Target, "target column")
	if err != nil {
		return nil, err
	}
	out := make([]float32, len(rows))
	idx := make(map[string]int, len(p.Labels))
	for k, s := range p.Labels {
		idx[s] = k
	}
	for i, r := range rows {
		if c.Missing(r) {
			return nil, fmt.Errorf("kiln: target column %q is missing in data row %d", c.Name, r+1)
		}
		if p.Task == Classification {
			k, ok := idx[cellString(c, r)]
			if !ok {
				return nil, fmt.Errorf("kiln: target column %q has label %q in data row %d, unseen in the training rows", c.Name, cellString(c, r), r+1)
			}
			out[i] = float32(k)
		} else {
			out[i] = float32(c.Num[r])
		}
	}
	return out, nil
}

// ClassTargets returns the class index of each row of EncodeTarget's
// output (for stratified splits), or nil for regression.
func (p *Preprocessor) ClassTargets(y []float32) []int {
	if p.Task != Classification {
		return nil
	}
	out := make([]int, len(y))
	for i, v := range y {
		out[i] = int(v)
	}
	return out
}

// Prelude compiles the fitted preprocessing into TorchScript for the
// start of forward: raw columns in (EncodeFeatures' layout), network
// features out.
func (p *Preprocessor) Prelude() nn.Prelude {
	pre := nn.Prelude{Inputs: int64(len(p.Features)), Features: int64(p.NumFeatures())}
	var numIdx []int64
	var fill, shift, scale []float32
	impute := false
	for j, f := range p.Features {
		if f.Categorical {
			continue
		}
		numIdx = append(numIdx, int64(j))
		v := float32(math.NaN())
		if f.Fill != nil {
			v = float32(*f.Fill)
			impute = true
		}
		fill = append(fill, v)
		shift = append(shift, float32(f.Shift))
		scale = append(scale, float32(f.Scale))
	}
	var parts []string
	if len(numIdx) > 0 {
		nn := int64(len(numIdx))
		if len(numIdx) != len(p.Features) {
			pre.Buffers = append(pre.Buffers, bufInt("pre_num_idx", numIdx))
			pre.Code = append(pre.Code, "xn = x.index_select(1, self.pre_num_idx)")
		} else {
			pre.Code = append(pre.Code, "xn = x")
		}
		if impute {
			pre.Buffers = append(pre.Buffers, bufFloat("pre_fill", fill, nn))
			pre.Code = append(pre.Code, "xn = torch.where(torch.isnan(xn), self.pre_fill, xn)")
		}
		pre.Buffers = append(pre.Buffers, bufFloat("pre_shift", shift, nn), bufFloat("pre_scale", scale, nn))
		pre.Code = append(pre.Code, "xn = (xn - self.pre_shift) / self.pre_scale")
		parts = append(parts, "xn")
	}
	for j, f := range p.Features {
		if !f.Categorical {
			continue
		}
		codes := make([]float32, len(f.Categories))
		for k := range codes {
			codes[k] = float32(k)
		}
		name := fmt.Sprintf("pre_cat%d", j)
		pre.Buffers = append(pre.Buffers, bufFloat(name, codes, int64(len(codes))))
		// [batch, 1] == [k] broadcasts to [batch, k]; NaN matches nothing.
		pre.Code = append(pre.Code, fmt.Sprintf("oh%d = torch.eq(x.narrow(1, %d, 1), self.%s).float()", j, j, name))
		parts = append(parts, fmt.Sprintf("oh%d", j))
	}
	if len(parts) == 1 {
		pre.Code = append(pre.Code, "x = "+parts[0])
	} else {
		pre.Code = append(pre.Code, "x = torch.cat(["+strings.Join(parts, ", ")+"], 1)")
	}
	return pre
}

func bufFloat(name string, v []float32, n int64) nn.Buffer {
	return nn.Buffer{Name: name, Shape: []int64{n}, Float: v}
}

func bufInt(name string, v []int64) nn.Buffer {
	return nn.Buffer{Name: name, Shape: []int64{int64(len(v))}, Int: v}
}
