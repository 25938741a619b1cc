package flightserver

import (
	"encoding/binary"
	"math"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/repository"
)

// Raw records over Flight (repository.Config Columns): each input is a
// column of the record, an Arrow string, large string or dictionary of
// strings for a BYTES (category) input, any numeric column for an FP32
// one; nulls are allowed (an empty category, NaN). gather turns it into
// float32 values or category codes, one per row.

// columnsPlan checks an input schema against a Columns config.
func columnsPlan(model string, cfg *repository.Config, schema *arrow.Schema) (*plan, error) {
	p := &plan{model: model, batched: true, maxRows: cfg.MaxBatchSize}
	for i := range cfg.Inputs {
		c := &cfg.Inputs[i]
		idx := schema.FieldIndices(c.Name)
		if len(idx) != 1 {
			return nil, invalidArg("model %q: the record needs exactly one column %q (%s), the schema has %d", model, c.Name, columnWant(c), len(idx))
		}
		t := schema.Field(idx[0]).Type
		ok := false
		if c.DataType == repository.Bytes {
			ok = isStringType(t)
		} else {
			ok = isNumberType(t)
		}
		if !ok {
			return nil, invalidArg("model %q: column %q has type %s, expected %s", model, c.Name, t, columnWant(c))
		}
		src := inputSource{name: c.Name, dt: core.Float32, cols: idx, rowShape: []int64{1}, rowElems: 1, column: c}
		p.inputs = append(p.inputs, src)
		p.dims = append(p.dims, c.Dims)
	}
	return p, nil
}

func columnWant(c *repository.TensorSpec) string {
	if c.DataType == repository.Bytes {
		return "a string or dictionary-of-strings column of its categories"
	}
	return "a numeric column"
}

func isStringType(t arrow.DataType) bool {
	switch t.ID() {
	case arrow.STRING, arrow.LARGE_STRING, arrow.STRING_VIEW:
		return true
	case arrow.DICTIONARY:
		return isStringType(t.(*arrow.DictionaryType).ValueType)
	}
	return false
}

func isNumberType(t arrow.DataType) bool {
	switch t.ID() {
	case arrow.FLOAT32, arrow.FLOAT64, arrow.INT8, arrow.INT16, arrow.INT32, arrow.INT64,
		arrow.UINT8, arrow.UINT16, arrow.UINT32, arrow.UINT64:
		return true
	}
	return false
}

// gatherColumn returns one record column as little-endian float32, one
// value per row: numbers (NaN for null) or category codes
// (repository.TensorSpec.Code; NaN for null or unknown).
func (src *inputSource) gatherColumn(rec arrow.RecordBatch) ([]byte, error) {
	col := rec.Column(src.cols[0])
	n := col.Len()
	out := make([]byte, 0, 4*n)
	put := func(v float32) { out = binary.LittleEndian.AppendUint32(out, math.Float32bits(v)) }
	nan := float32(math.NaN())
	if src.column.DataType == repository.Bytes {
		str := func(a arrow.Array, i int) []byte {
			switch s := a.(type) {
			case *array.String:
				return []byte(s.Value(i))
			case *array.LargeString:
				return []byte(s.Value(i))
			case *array.StringView:
				return []byte(s.Value(i))
			}
			return nil
		}
		for i := range n {
			if col.IsNull(i) {
				put(nan)
				continue
			}
			if d, ok := col.(*array.Dictionary); ok {
				put(src.column.Code(str(d.Dictionary(), d.GetValueIndex(i))))
				continue
			}
			put(src.column.Code(str(col, i)))
		}
		return out, nil
	}
	for i := range n {
		if col.IsNull(i) {
			put(nan)
			continue
		}
		var v float64
		switch a := col.(type) {
		case *array.Float32:
			v = float64(a.Value(i))
		case *array.Float64:
			v = a.Value(i)
		case *array.Int8:
			v = float64(a.Value(i))
		case *array.Int16:
			v = float64(a.Value(i))
		case *array.Int32:
			v = float64(a.Value(i))
		case *array.Int64:
			v = float64(a.Value(i))
		case *array.Uint8:
			v = float64(a.Value(i))
		case *array.Uint16:
			v = float64(a.Value(i))
		case *array.Uint32:
			v = float64(a.Value(i))
		case *array.Uint64:
			v = float64(a.Value(i))
		default:
			return nil, invalidArg("input column %q: type %s is not numeric", src.name, col.DataType())
		}
		put(float32(v))
	}
	return out, nil
}
