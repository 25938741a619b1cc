package grpcserver

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/batcher"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/limits"
	"github.com/kilnml/kiln/serving/repository"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// decodeLimits bound what decodeInputs accepts; zero fields mean
// limits.Defaults'.
type decodeLimits struct {
	maxInputs   int
	maxElements int64
}

func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

func shapeString(s []int64) string {
	parts := make([]string, len(s))
	for i, d := range s {
		parts[i] = strconv.FormatInt(d, 10)
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// expectedShape returns an input's full expected shape, -1 for the batch
// dimension and variable dims.
func expectedShape(cfg *repository.Config, t repository.TensorSpec) []int64 {
	if cfg.MaxBatchSize > 0 {
		return append([]int64{-1}, t.Dims...)
	}
	return slices.Clone(t.Dims)
}

// decodeInputs checks a request's inputs against the configuration and
// returns them in the configuration's order. Every error is an
// INVALID_ARGUMENT status naming the input.
//
// The shapes are the sender's claims: no buffer is sized by one before it
// is checked against lim and against the bytes or values received.
func decodeInputs(model string, cfg *repository.Config, req *pb.ModelInferRequest, lim decodeLimits) ([]batcher.Tensor, error) {
	if lim.maxInputs <= 0 {
		lim.maxInputs = limits.DefaultMaxInputs
	}
	if lim.maxElements <= 0 {
		lim.maxElements = limits.DefaultMaxTensorElements
	}
	if n := len(req.GetInputs()); n > lim.maxInputs {
		return nil, invalid("model %q: the request has %d inputs, more than the limit of %d", model, n, lim.maxInputs)
	}
	raw := req.GetRawInputContents()
	if len(raw) > 0 && len(raw) != len(req.GetInputs()) {
		return nil, invalid("model %q: raw_input_contents has %d entries for %d inputs", model, len(raw), len(req.GetInputs()))
	}
	byName := map[string]int{}
	for i, in := range req.GetInputs() {
		if _, dup := byName[in.GetName()]; dup {
			return nil, invalid("model %q: input %q is given twice", model, in.GetName())
		}
		known := false
		for _, c := range cfg.Inputs {
			known = known || c.Name == in.GetName()
		}
		if !known {
			names := make([]string, len(cfg.Inputs))
			for j, c := range cfg.Inputs {
				names[j] = c.Name
			}
			return nil, invalid("model %q: unexpected input %q (the model takes %s)", model, in.GetName(), strings.Join(names, ", "))
		}
		byName[in.GetName()] = i
	}
	out := make([]batcher.Tensor, len(cfg.Inputs))
	var batch int64 = -1
	for ci, c := range cfg.Inputs {
		i, ok := byName[c.Name]
		if !ok {
			return nil, invalid("model %q: missing input %q (%s %s)", model, c.Name, c.DataType, shapeString(expectedShape(cfg, c)))
		}
		in := req.GetInputs()[i]
		want := expectedShape(cfg, c)
		got := in.GetShape()
		if dt := repository.DataType(in.GetDatatype()); dt != c.DataType {
			return nil, invalid("input %q: expected datatype %s, received %q", c.Name, c.DataType, in.GetDatatype())
		}
		if len(got) != len(want) {
			return nil, invalid("input %q: expected shape %s, received %s", c.Name, shapeString(want), shapeString(got))
		}
		for k, d := range got {
			if d < 0 {
				return nil, invalid("input %q: dimension %d is negative in shape %s (expected %s)", c.Name, k, shapeString(got), shapeString(want))
			}
			if want[k] != -1 && want[k] != d {
				return nil, invalid("input %q: expected shape %s, received %s", c.Name, shapeString(want), shapeString(got))
			}
		}
		if cfg.MaxBatchSize > 0 {
			switch {
			case got[0] < 1:
				return nil, invalid("input %q: batch size is 0 in shape %s", c.Name, shapeString(got))
			case got[0] > int64(cfg.MaxBatchSize):
				return nil, invalid("input %q: batch size %d in shape %s exceeds max_batch_size %d", c.Name, got[0], shapeString(got), cfg.MaxBatchSize)
			case batch >= 0 && got[0] != batch:
				return nil, invalid("input %q: batch size %d differs from the other inputs' %d", c.Name, got[0], batch)
			}
			batch = got[0]
		}
		size := int64(c.DataType.Size())
		n := int64(1)
		for _, d := range got {
			if d != 0 && n > lim.maxElements/d {
				return nil, invalid("input %q: shape %s is too large: more than the limit of %d elements", c.Name, shapeString(got), lim.maxElements)
			}
			n *= d
		}
		if c.DataType == repository.Bytes {
			// A category column of a raw record (repository.Config
			// Columns): strings in, float32 category codes out.
			var elems [][]byte
			if len(raw) > 0 {
				if in.GetContents() != nil {
					return nil, invalid("input %q: give either raw_input_contents or contents, not both", c.Name)
				}
				var err error
				if elems, err = repository.SplitBytes(raw[i], n); err != nil {
					return nil, invalid("input %q: raw_input_contents: %v", c.Name, err)
				}
			} else {
				elems = in.GetContents().GetBytesContents()
				if int64(len(elems)) != n {
					return nil, invalid("input %q: contents hold %d BYTES values (bytes_contents), shape %s needs %d", c.Name, len(elems), shapeString(got), n)
				}
			}
			out[ci] = batcher.Tensor{DType: core.Float32, Shape: slices.Clone(got), Data: cfg.Inputs[ci].Codes(elems)}
			continue
		}
		dt, _ := c.DataType.DType()
		var data []byte
		if len(raw) > 0 {
			if in.GetContents() != nil {
				return nil, invalid("input %q: give either raw_input_contents or contents, not both", c.Name)
			}
			data = raw[i]
			if int64(len(data)) != n*size {
				return nil, invalid("input %q: raw_input_contents holds %d bytes, shape %s of %s needs %d", c.Name, len(data), shapeString(got), c.DataType, n*size)
			}
		} else {
			var err error
			if data, err = typedContents(c, in.GetContents(), n, got); err != nil {
				return nil, err
			}
		}
		if c.DataType == repository.Bool {
			for _, b := range data {
				if b > 1 {
					return nil, invalid("input %q: BOOL elements must be 0 or 1, got %d", c.Name, b)
				}
			}
		}
		out[ci] = batcher.Tensor{DType: dt, Shape: slices.Clone(got), Data: data}
	}
	return out, nil
}

// typedContents converts an input's typed contents to raw little-endian
// bytes.
func typedContents(c repository.TensorSpec, tc *pb.InferTensorContents, n int64, shape []int64) ([]byte, error) {
	if tc == nil {
		return nil, invalid("input %q: no data: neither raw_input_contents nor contents", c.Name)
	}
	count := func(k int) error {
		if int64(k) != n {
			return invalid("input %q: contents hold %d %s values, shape %s needs %d", c.Name, k, c.DataType, shapeString(shape), n)
		}
		return nil
	}
	size := c.DataType.Size()
	// The shape is the sender's claim: count the values actually received
	// before allocating anything sized by it.
	var got int
	switch c.DataType {
	case repository.Bool:
		got = len(tc.GetBoolContents())
	case repository.Int8, repository.Int16, repository.Int32:
		got = len(tc.GetIntContents())
	case repository.Uint8:
		got = len(tc.GetUintContents())
	case repository.Int64:
		got = len(tc.GetInt64Contents())
	case repository.FP32:
		got = len(tc.GetFp32Contents())
	case repository.FP64:
		got = len(tc.GetFp64Contents())
	default:
		return nil, invalid("input %q: %s data must be sent in raw_input_contents", c.Name, c.DataType)
	}
	if err := count(got); err != nil {
		return nil, err
	}
	buf := make([]byte, 0, n*int64(size))
	le := binary.LittleEndian
	ints := func(vals []int32, lo, hi int32) ([]byte, error) {
		for _, v := range vals {
			if v < lo || v > hi {
				return nil, invalid("input %q: value %d does not fit %s", c.Name, v, c.DataType)
			}
			switch size {
			case 1:
				buf = append(buf, byte(v))
			case 2:
				buf = le.AppendUint16(buf, uint16(v))
			default:
				buf = le.AppendUint32(buf, uint32(v))
			}
		}
		return buf, nil
	}
	switch c.DataType {
	case repository.Bool:
		if err := count(len(tc.GetBoolContents())); err != nil {
			return nil, err
		}
		for _, v := range tc.GetBoolContents() {
			if v {
				buf = append(buf, 1)
			} else {
				buf = append(buf, 0)
			}
		}
		return buf, nil
	case repository.Int8:
		return ints(tc.GetIntContents(), math.MinInt8, math.MaxInt8)
	case repository.Int16:
		return ints(tc.GetIntContents(), math.MinInt16, math.MaxInt16)
	case repository.Int32:
		return ints(tc.GetIntContents(), math.MinInt32, math.MaxInt32)
	case repository.Uint8:
		vals := tc.GetUintContents()
		if err := count(len(vals)); err != nil {
			return nil, err
		}
		for _, v := range vals {
			if v > math.MaxUint8 {
				return nil, invalid("input %q: value %d does not fit UINT8", c.Name, v)
			}
			buf = append(buf, byte(v))
		}
		return buf, nil
	case repository.Int64:
		if err := count(len(tc.GetInt64Contents())); err != nil {
			return nil, err
		}
		for _, v := range tc.GetInt64Contents() {
			buf = le.AppendUint64(buf, uint64(v))
		}
		return buf, nil
	case repository.FP32:
		if err := count(len(tc.GetFp32Contents())); err != nil {
			return nil, err
		}
		for _, v := range tc.GetFp32Contents() {
			buf = le.AppendUint32(buf, math.Float32bits(v))
		}
		return buf, nil
	case repository.FP64:
		if err := count(len(tc.GetFp64Contents())); err != nil {
			return nil, err
		}
		for _, v := range tc.GetFp64Contents() {
			buf = le.AppendUint64(buf, math.Float64bits(v))
		}
		return buf, nil
	}
	return nil, invalid("input %q: %s data must be sent in raw_input_contents", c.Name, c.DataType)
}

// toFloat64 decodes a tensor's elements for ranking.
func toFloat64(t batcher.Tensor) ([]float64, error) {
	le := binary.LittleEndian
	size := t.DType.Size()
	if size == 0 || len(t.Data)%size != 0 {
		return nil, fmt.Errorf("cannot decode %v", t.DType)
	}
	out := make([]float64, len(t.Data)/size)
	for i := range out {
		b := t.Data[i*size:]
		switch t.DType {
		case core.Float32:
			out[i] = float64(math.Float32frombits(le.Uint32(b)))
		case core.Float64:
			out[i] = math.Float64frombits(le.Uint64(b))
		case core.Float16:
			out[i] = float64(core.Half(le.Uint16(b)).Float32())
		case core.BFloat16:
			out[i] = float64(core.BHalf(le.Uint16(b)).Float32())
		case core.Int64:
			out[i] = float64(int64(le.Uint64(b)))
		case core.Int32:
			out[i] = float64(int32(le.Uint32(b)))
		case core.Int16:
			out[i] = float64(int16(le.Uint16(b)))
		case core.Int8:
			out[i] = float64(int8(b[0]))
		case core.Uint8, core.Bool:
			out[i] = float64(b[0])
		default:
			return nil, fmt.Errorf("cannot rank %v values", t.DType)
		}
	}
	return out, nil
}

// classify implements the classification extension: the top k classes of
// each batch element as "score:index[:label]" BYTES elements.
//
// binaryKind ("logit" or "probability", the output's repository.TensorSpec
// Binary) makes one value per element the score of class 1: the element is
// ranked as two classes, labels[1] with probability p (the value, or its
// sigmoid for a logit) and labels[0] with 1 - p.
func classify(t batcher.Tensor, k int, labels []string, batched bool, binaryKind string) ([]int64, []byte, error) {
	vals, err := toFloat64(t)
	if err != nil {
		return nil, nil, err
	}
	rows := 1
	if batched && len(t.Shape) > 0 {
		rows = int(t.Shape[0])
	}
	if rows == 0 || len(vals)%rows != 0 {
		return nil, nil, fmt.Errorf("cannot classify shape %v", t.Shape)
	}
	if binaryKind != "" && len(vals) == rows {
		two := make([]float64, 0, 2*rows)
		for _, v := range vals {
			p := v
			if binaryKind == "logit" {
				p = 1 / (1 + math.Exp(-v))
			}
			two = append(two, 1-p, p)
		}
		vals = two
	}
	classes := len(vals) / rows
	k = min(k, classes)
	var buf []byte
	idx := make([]int, classes)
	for r := range rows {
		row := vals[r*classes : (r+1)*classes]
		for i := range idx {
			idx[i] = i
		}
		slices.SortStableFunc(idx, func(a, b int) int {
			switch {
			case row[a] > row[b]:
				return -1
			case row[a] < row[b]:
				return 1
			}
			return 0
		})
		for _, i := range idx[:k] {
			s := strconv.FormatFloat(row[i], 'f', 6, 64) + ":" + strconv.Itoa(i)
			if i < len(labels) {
				s += ":" + labels[i]
			}
			buf = binary.LittleEndian.AppendUint32(buf, uint32(len(s)))
			buf = append(buf, s...)
		}
	}
	if batched {
		return []int64{int64(rows), int64(k)}, buf, nil
	}
	return []int64{int64(k)}, buf, nil
}
