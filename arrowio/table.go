package arrowio

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/parquet/pqarrow"

	"github.com/kilnml/kiln/core/data"
)

// ReadTable reads the Arrow IPC file, IPC stream or Parquet file at path
// (recognized by their magic bytes, as OpenDataset does) into a core/data
// Table for training: the named columns, in that order, or every column
// when columns is empty (Parquet files are read column-projected).
//
// Integer, floating-point and boolean columns (true is 1) become numeric
// columns, with NaN for nulls. String, large string and string-view
// columns, and dictionary columns of strings, become categorical columns
// with "" for nulls (so an empty string is a missing value too, as in CSV).
// Dictionary columns of integers are categorical as well, their values
// written in decimal. Other types are errors naming the column.
//
// The table's Fingerprint is the SHA-256 of the file's bytes, as ReadCSV's
// is of the CSV's, so a model package records which file it learned from.
//
// A malformed file is an INVALID_ARGUMENT error: every record batch is
// checked (array.ValidateFull) before its values are read. One whose
// metadata declares more than it can hold (an IPC message larger than the
// file, a buffer that would expand to more than 1024 times the file's
// size) is refused before that is allocated, RESOURCE_EXHAUSTED for the
// expansion.
func ReadTable(path string, columns []string) (*data.Table, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("arrowio: table: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	size, err := io.Copy(h, f)
	if err != nil {
		return nil, fmt.Errorf("arrowio: table %s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("arrowio: table %s: %w", path, err)
	}
	t, err := readTable(f, size, columns)
	if err != nil {
		return nil, fmt.Errorf("arrowio: table %s: %w", path, err)
	}
	t.Fingerprint = hex.EncodeToString(h.Sum(nil))
	return t, nil
}

// readTable reads the IPC file, IPC stream or Parquet file f of size bytes
// into a Table without a fingerprint, as ReadTable does.
func readTable(f source, size int64, columns []string) (*data.Table, error) {
	rdr, closeSrc, err := openSource(f, size, columns, 0, memory.DefaultAllocator)
	if err != nil {
		return nil, err
	}
	defer closeSrc()
	defer rdr.Release()
	t, err := tableFromRecords(rdr, columns)
	return t, invalid(err)
}

// TableFromRecords reads every record batch of rdr into a core/data Table,
// converting the named columns (every column when columns is empty) as
// ReadTable does. The fingerprint is a SHA-256 of the column names and
// values read. rdr is consumed but not released.
func TableFromRecords(rdr array.RecordReader, columns []string) (*data.Table, error) {
	t, err := tableFromRecords(rdr, columns)
	if err != nil {
		return nil, fmt.Errorf("arrowio: table: %w", invalid(err))
	}
	h := sha256.New()
	for _, c := range t.Columns {
		fmt.Fprintf(h, "%s\x00%t\x00", c.Name, c.Categorical)
		if c.Categorical {
			for _, s := range c.Str {
				fmt.Fprintf(h, "%d:%s,", len(s), s)
			}
		} else {
			for _, v := range c.Num {
				fmt.Fprintf(h, "%x,", math.Float64bits(v))
			}
		}
	}
	t.Fingerprint = hex.EncodeToString(h.Sum(nil))
	return t, nil
}

func parquetNames(fr *pqarrow.FileReader) []string {
	var names []string
	for i := range fr.Manifest.Fields {
		names = append(names, fr.Manifest.Fields[i].Field.Name)
	}
	return names
}

// tableColumn accumulates one selected column.
type tableColumn struct {
	col *data.Column
	idx int
}

func tableFromRecords(rdr array.RecordReader, columns []string) (*data.Table, error) {
	schema := rdr.Schema()
	if len(columns) == 0 {
		for _, f := range schema.Fields() {
			columns = append(columns, f.Name)
		}
	}
	if len(columns) == 0 {
		return nil, errors.New("the data has no columns")
	}
	cols := make([]tableColumn, len(columns))
	seen := map[string]bool{}
	for i, name := range columns {
		if seen[name] {
			return nil, fmt.Errorf("column %q is selected twice", name)
		}
		seen[name] = true
		idx := schema.FieldIndices(name)
		switch {
		case len(idx) == 0:
			return nil, fmt.Errorf("column %q not found; the data has columns %v", name, fieldNames(schema))
		case len(idx) > 1:
			return nil, fmt.Errorf("column %q: the schema has it %d times", name, len(idx))
		}
		cat, err := categoricalType(schema.Field(idx[0]).Type)
		if err != nil {
			return nil, fmt.Errorf("column %q: %w", name, err)
		}
		cols[i] = tableColumn{col: &data.Column{Name: name, Categorical: cat}, idx: idx[0]}
	}
	for {
		rec, err := readNext(rdr)
		if err != nil {
			return nil, err
		}
		if rec == nil {
			break
		}
		for _, c := range cols {
			if err := appendColumn(c.col, rec.Column(c.idx)); err != nil {
				return nil, fmt.Errorf("column %q: %w", c.col.Name, err)
			}
		}
	}
	t := &data.Table{}
	for _, c := range cols {
		t.Columns = append(t.Columns, c.col)
	}
	return t, nil
}

func fieldNames(s *arrow.Schema) []string {
	names := make([]string, s.NumFields())
	for i, f := range s.Fields() {
		names[i] = f.Name
	}
	return names
}

// categoricalType reports whether a column of type dt is categorical (true)
// or numeric (false), or why it can be neither.
func categoricalType(dt arrow.DataType) (bool, error) {
	switch dt.ID() {
	case arrow.STRING, arrow.LARGE_STRING, arrow.STRING_VIEW:
		return true, nil
	case arrow.BOOL:
		return false, nil
	case arrow.DICTIONARY:
		vt := dt.(*arrow.DictionaryType).ValueType
		switch {
		case vt.ID() == arrow.STRING || vt.ID() == arrow.LARGE_STRING || vt.ID() == arrow.STRING_VIEW:
			return true, nil
		case arrow.IsInteger(vt.ID()):
			return true, nil
		}
		return false, fmt.Errorf("dictionary of %s is not supported (want strings or integers)", vt)
	}
	if arrow.IsInteger(dt.ID()) || arrow.IsFloating(dt.ID()) {
		return false, nil
	}
	return false, fmt.Errorf("type %s is neither numeric nor text (select numeric, boolean, string or dictionary columns)", dt)
}

// appendColumn appends arr's values to c.
func appendColumn(c *data.Column, arr arrow.Array) error {
	n := arr.Len()
	if c.Categorical {
		get, err := stringGetter(arr)
		if err != nil {
			return err
		}
		for i := 0; i < n; i++ {
			if arr.IsNull(i) {
				c.Str = append(c.Str, "")
				continue
			}
			c.Str = append(c.Str, get(i))
		}
		return nil
	}
	get, err := numberGetter(arr)
	if err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		if arr.IsNull(i) {
			c.Num = append(c.Num, math.NaN())
			continue
		}
		c.Num = append(c.Num, get(i))
	}
	return nil
}

func stringGetter(arr arrow.Array) (func(int) string, error) {
	switch a := arr.(type) {
	case *array.String:
		return a.Value, nil
	case *array.LargeString:
		return a.Value, nil
	case *array.StringView:
		return a.Value, nil
	case *array.Dictionary:
		dict := a.Dictionary()
		var get func(int) string
		if g, err := stringGetter(dict); err == nil {
			get = g
		} else if num, err := numberGetter(dict); err == nil && arrow.IsInteger(dict.DataType().ID()) {
			get = func(i int) string { return fmt.Sprintf("%d", int64(num(i))) }
		} else {
			return nil, fmt.Errorf("dictionary of %s is not supported", dict.DataType())
		}
		return func(i int) string {
			j := a.GetValueIndex(i)
			if dict.IsNull(j) {
				return ""
			}
			return get(j)
		}, nil
	}
	return nil, fmt.Errorf("type %s is not text", arr.DataType())
}

func numberGetter(arr arrow.Array) (func(int) float64, error) {
	switch a := arr.(type) {
	case *array.Float64:
		return a.Value, nil
	case *array.Float32:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Float16:
		return func(i int) float64 { return float64(a.Value(i).Float32()) }, nil
	case *array.Int8:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Int16:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Int32:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Int64:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Uint8:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Uint16:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Uint32:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Uint64:
		return func(i int) float64 { return float64(a.Value(i)) }, nil
	case *array.Boolean:
		return func(i int) float64 {
			if a.Value(i) {
				return 1
			}
			return 0
		}, nil
	}
	return nil, fmt.Errorf("type %s is not numeric", arr.DataType())
}
