package flightserver

import (
	"fmt"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
)

// validateRecord checks rec fully, so that a malformed or lying IPC message
// sent by a client is refused rather than stored or read out of bounds: its
// buffers hold what its lengths promise, offsets are in bounds and
// non-decreasing, each null count is the number of zero bits of its
// validity bitmap, dictionary indices lie within their dictionary, and the
// same for every child and dictionary (arrow-go's array.ValidateFull, the
// checks of Arrow C++'s ValidateFull that pyarrow's validate(full=True)
// runs). The IPC reader only checks that buffers lie within the message
// body. The error names the column.
func validateRecord(rec arrow.RecordBatch) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("malformed record batch: %v", p)
		}
	}()
	n := rec.NumRows()
	for i, col := range rec.Columns() {
		name := rec.Schema().Field(i).Name
		if int64(col.Len()) != n {
			return fmt.Errorf("column %q has %d rows, the batch %d", name, col.Len(), n)
		}
		if err := validateData(col.Data()); err != nil {
			return fmt.Errorf("column %q: %w", name, err)
		}
		// The package function, not the arrays' ValidateFull method: only
		// it recounts the nulls of every array (children and dictionaries
		// too) from its validity bitmap and checks dictionary indices
		// against their dictionary, besides offsets and lengths.
		if err := array.ValidateFull(col); err != nil {
			return fmt.Errorf("column %q: %w", name, err)
		}
	}
	return nil
}

func bitmapBytes(n int64) int64 { return (n + 7) / 8 }

// validateData checks the sizes of data's buffers and of its children's.
func validateData(d arrow.ArrayData) error {
	typ := d.DataType()
	if ext, ok := typ.(arrow.ExtensionType); ok {
		typ = ext.StorageType()
	}
	off, n := int64(d.Offset()), int64(d.Len())
	if off < 0 || n < 0 {
		return fmt.Errorf("negative offset %d or length %d", off, n)
	}
	end := off + n
	bufs := d.Buffers()
	bufLen := func(i int) int64 {
		if i >= len(bufs) || bufs[i] == nil {
			return 0
		}
		return int64(bufs[i].Len())
	}
	if d.NullN() != 0 && typ.ID() != arrow.NULL && len(bufs) > 0 && bufs[0] != nil && bufLen(0) < bitmapBytes(end) {
		return fmt.Errorf("validity bitmap of %d bytes for %d values", bufLen(0), end)
	}
	switch t := typ.(type) {
	case arrow.FixedWidthDataType:
		bits := int64(t.BitWidth())
		need := (end*bits + 7) / 8
		if bufLen(1) < need {
			return fmt.Errorf("%s values buffer of %d bytes for %d values (needs %d)", typ, bufLen(1), end, need)
		}
	case *arrow.FixedSizeListType:
		ch := d.Children()
		if len(ch) != 1 {
			return fmt.Errorf("%s with %d children", typ, len(ch))
		}
		if need := end * int64(t.Len()); int64(ch[0].Len()) < need {
			return fmt.Errorf("%s child of %d values for %d lists (needs %d)", typ, ch[0].Len(), end, need)
		}
		return validateData(ch[0])
	case *arrow.StructType:
		for i, c := range d.Children() {
			if int64(c.Len()) < end {
				return fmt.Errorf("struct field %d has %d values for %d rows", i, c.Len(), end)
			}
			if err := validateData(c); err != nil {
				return err
			}
		}
	default:
		// Variable-size layouts (strings, lists, ...) are checked with the
		// arrays' own ValidateFull; their children too.
		for _, c := range d.Children() {
			arr := array.MakeFromData(c)
			v, ok := arr.(interface{ ValidateFull() error })
			var err error
			if ok {
				err = v.ValidateFull()
			}
			arr.Release()
			if err != nil {
				return err
			}
			if err := validateData(c); err != nil {
				return err
			}
		}
	}
	return nil
}
