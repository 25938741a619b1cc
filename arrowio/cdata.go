package arrowio

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/cdata"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// The C Data Interface functions take the addresses of C structs
// ArrowArray and ArrowSchema, as pyarrow's _export_to_c and _import_from_c
// do. Importing moves the structs: Go owns what they held and marks them
// released. Exporting fills structs the caller allocated; the caller (or
// whoever it moves them to) must call their release callbacks.
//
// arrow-go's cdata neither exports extension arrays correctly (it drops
// the storage's children) nor rebuilds extension types on import, so these
// functions export an extension column as its storage with the
// ARROW:extension:name and ARROW:extension:metadata keys on the field, the
// way the C Data Interface specifies and pyarrow expects, and turn such
// fields back into registered extension types on import. Extension types
// nested inside other types (in a struct or list) are not handled.

// ImportArray imports the array at arrayPtr, described by the schema at
// schemaPtr (addresses of struct ArrowArray and struct ArrowSchema). An
// extension field of a registered type (such as arrow.fixed_shape_tensor)
// becomes an array of that type. The array's buffers are known as C memory
// (see IsCMemory), so tensors made from it need not copy: the producer must
// therefore hand over memory outside the Go heap, as every foreign
// producer (pyarrow, Arrow C++) does; do not re-import, in the same process,
// arrays that arrow-go exported from Go-allocated buffers. The caller must
// Release the array.
func ImportArray(arrayPtr, schemaPtr uintptr) (arrow.Field, arrow.Array, error) {
	if arrayPtr == 0 || schemaPtr == 0 {
		return arrow.Field{}, nil, errors.New("arrowio: import array: nil ArrowArray or ArrowSchema")
	}
	field, arr, err := cdata.ImportCArray(cdata.ArrayFromPtr(arrayPtr), cdata.SchemaFromPtr(schemaPtr))
	if err != nil {
		return arrow.Field{}, nil, fmt.Errorf("arrowio: import array: %w", err)
	}
	defer arr.Release()
	field, ext, err := applyExtension(field, arr)
	if err != nil {
		return arrow.Field{}, nil, fmt.Errorf("arrowio: import array: %w", err)
	}
	defer ext.Release()
	return field, adoptArray(ext), nil
}

// ImportRecordBatch imports the record batch at arrayPtr (a struct array)
// with the schema at schemaPtr, as ImportArray does for each column. The
// caller must Release the batch.
func ImportRecordBatch(arrayPtr, schemaPtr uintptr) (arrow.RecordBatch, error) {
	if arrayPtr == 0 || schemaPtr == 0 {
		return nil, errors.New("arrowio: import record batch: nil ArrowArray or ArrowSchema")
	}
	rec, err := cdata.ImportCRecordBatch(cdata.ArrayFromPtr(arrayPtr), cdata.SchemaFromPtr(schemaPtr))
	if err != nil {
		return nil, fmt.Errorf("arrowio: import record batch: %w", err)
	}
	defer rec.Release()
	fields := make([]arrow.Field, rec.NumCols())
	cols := make([]arrow.Array, rec.NumCols())
	defer func() {
		for _, c := range cols {
			if c != nil {
				c.Release()
			}
		}
	}()
	for i, f := range rec.Schema().Fields() {
		nf, ext, err := applyExtension(f, rec.Column(i))
		if err != nil {
			return nil, fmt.Errorf("arrowio: import record batch: column %q: %w", f.Name, err)
		}
		fields[i], cols[i] = nf, adoptArray(ext)
		ext.Release()
	}
	md := rec.Schema().Metadata()
	return array.NewRecordBatch(arrow.NewSchema(fields, &md), cols, rec.NumRows()), nil
}

// applyExtension turns a field carrying ARROW:extension:name of a
// registered extension type, and its storage array, into a field and array
// of that type, without the extension keys in the field's metadata. Other
// fields come back unchanged. The array returned must be released.
func applyExtension(f arrow.Field, arr arrow.Array) (arrow.Field, arrow.Array, error) {
	i := f.Metadata.FindKey(ipc.ExtensionTypeKeyName)
	if i < 0 || f.Type.ID() == arrow.EXTENSION {
		arr.Retain()
		return f, arr, nil
	}
	proto := arrow.GetExtensionType(f.Metadata.Values()[i])
	if proto == nil { // unknown extension: keep the storage, as IPC does
		arr.Retain()
		return f, arr, nil
	}
	var serialized string
	if j := f.Metadata.FindKey(ipc.ExtensionMetadataKeyName); j >= 0 {
		serialized = f.Metadata.Values()[j]
	}
	typ, err := proto.Deserialize(f.Type, serialized)
	if err != nil {
		return f, nil, err
	}
	var keys, vals []string
	for k, key := range f.Metadata.Keys() {
		if key != ipc.ExtensionTypeKeyName && key != ipc.ExtensionMetadataKeyName {
			keys, vals = append(keys, key), append(vals, f.Metadata.Values()[k])
		}
	}
	f.Type, f.Metadata = typ, arrow.NewMetadata(keys, vals)
	return f, array.NewExtensionArrayWithStorage(typ, arr), nil
}

// cOwned is the allocator of a buffer that re-wraps an imported C buffer:
// freeing it forgets the region and releases the imported buffer, whose
// producer then frees the memory.
type cOwned struct{ buf *memory.Buffer }

func (*cOwned) Allocate(int) []byte { panic("arrowio: an imported buffer cannot allocate") }

func (*cOwned) Reallocate(int, []byte) []byte { panic("arrowio: an imported buffer cannot grow") }

func (o *cOwned) Free(b []byte) {
	unregisterC(b)
	o.buf.Release()
}

// adoptArray returns a new reference to an array with arr's data whose
// buffers are recorded as C memory for as long as they live.
func adoptArray(arr arrow.Array) arrow.Array {
	d := adoptData(arr.Data())
	defer d.Release()
	return array.MakeFromData(d)
}

func adoptData(d arrow.ArrayData) arrow.ArrayData {
	bufs := make([]*memory.Buffer, len(d.Buffers()))
	for i, b := range d.Buffers() {
		if b == nil || b.Len() == 0 {
			bufs[i] = b
			continue
		}
		b.Retain()
		raw := b.Bytes()
		registerC(raw)
		bufs[i] = memory.NewBufferWithAllocator(raw, &cOwned{buf: b})
	}
	children := make([]arrow.ArrayData, len(d.Children()))
	for i, c := range d.Children() {
		children[i] = adoptData(c)
	}
	var out arrow.ArrayData
	if dict, ok := d.Dictionary().(*array.Data); ok && dict != nil {
		ad := adoptData(dict)
		out = array.NewDataWithDictionary(d.DataType(), d.Len(), bufs, d.NullN(), d.Offset(), ad.(*array.Data))
		ad.Release()
	} else {
		out = array.NewData(d.DataType(), d.Len(), bufs, children, d.NullN(), d.Offset())
	}
	for _, b := range bufs {
		if b != nil && b.Len() > 0 {
			b.Release() // NewData holds its own reference
		}
	}
	for _, c := range children {
		c.Release()
	}
	return out
}

// storageField returns the field as the C Data Interface carries it: an
// extension type's storage type with the extension name and serialized
// parameters in the field's metadata.
func storageField(f arrow.Field) arrow.Field {
	ext, ok := f.Type.(arrow.ExtensionType)
	if !ok {
		return f
	}
	keys := []string{ipc.ExtensionTypeKeyName, ipc.ExtensionMetadataKeyName}
	vals := []string{ext.ExtensionName(), ext.Serialize()}
	for i, k := range f.Metadata.Keys() {
		if k != ipc.ExtensionTypeKeyName && k != ipc.ExtensionMetadataKeyName {
			keys, vals = append(keys, k), append(vals, f.Metadata.Values()[i])
		}
	}
	f.Type, f.Metadata = ext.StorageType(), arrow.NewMetadata(keys, vals)
	return f
}

// storageArray returns a new reference to arr's storage if arr is an
// extension array, to arr otherwise.
func storageArray(arr arrow.Array) arrow.Array {
	if e, ok := arr.(array.ExtensionArray); ok {
		arr = e.Storage()
	}
	arr.Retain()
	return arr
}

// cSchema mirrors struct ArrowSchema of the C Data Interface, whose layout
// the specification fixes.
type cSchema struct {
	format, name, metadata unsafe.Pointer
	flags, nChildren       int64
	children               *unsafe.Pointer
	dictionary             unsafe.Pointer
	release                unsafe.Pointer
	privateData            unsafe.Pointer
}

// ExportArray exports arr into the struct ArrowArray at arrayPtr and, when
// schemaPtr is not 0, its type into the struct ArrowSchema at schemaPtr, as
// a field named name. An extension array is exported as its storage with
// the extension metadata on the field. The export holds its own reference
// to arr's data until the consumer calls the release callbacks.
func ExportArray(arr arrow.Array, name string, arrayPtr, schemaPtr uintptr) error {
	if arrayPtr == 0 {
		return errors.New("arrowio: export array: nil ArrowArray")
	}
	if schemaPtr != 0 {
		// Export a one-field schema and move the field out of it, as the C
		// Data Interface allows: this carries the field's metadata, which
		// exporting an array's type alone drops.
		f := storageField(arrow.Field{Name: name, Type: arr.DataType(), Nullable: true})
		var tmp cdata.CArrowSchema
		cdata.ExportArrowSchema(arrow.NewSchema([]arrow.Field{f}, nil), &tmp)
		parent := (*cSchema)(unsafe.Pointer(&tmp))
		child := (*cSchema)(*parent.children)
		*(*cSchema)(unsafe.Pointer(cdata.SchemaFromPtr(schemaPtr))) = *child
		child.release = nil // moved
		cdata.ReleaseCArrowSchema(&tmp)
	}
	st := storageArray(arr)
	defer st.Release()
	cdata.ExportArrowArray(st, cdata.ArrayFromPtr(arrayPtr), nil)
	return nil
}

// ExportRecordBatch exports rec into the struct ArrowArray at arrayPtr (as
// a struct array) and, when schemaPtr is not 0, its schema into the struct
// ArrowSchema at schemaPtr. Extension columns are exported as their storage
// with the extension metadata on their fields. The export holds its own
// reference to rec's data until the consumer calls the release callbacks.
func ExportRecordBatch(rec arrow.RecordBatch, arrayPtr, schemaPtr uintptr) error {
	if arrayPtr == 0 {
		return errors.New("arrowio: export record batch: nil ArrowArray")
	}
	st := storageRecord(rec)
	defer st.Release()
	var outSchema *cdata.CArrowSchema
	if schemaPtr != 0 {
		outSchema = cdata.SchemaFromPtr(schemaPtr)
	}
	cdata.ExportArrowRecordBatch(st, cdata.ArrayFromPtr(arrayPtr), outSchema)
	return nil
}

// storageRecord returns rec with extension columns replaced by their
// storage and extension metadata on their fields.
func storageRecord(rec arrow.RecordBatch) arrow.RecordBatch {
	fields := make([]arrow.Field, rec.NumCols())
	cols := make([]arrow.Array, rec.NumCols())
	for i, f := range rec.Schema().Fields() {
		fields[i] = storageField(f)
		cols[i] = storageArray(rec.Column(i))
	}
	defer func() {
		for _, c := range cols {
			c.Release()
		}
	}()
	md := rec.Schema().Metadata()
	return array.NewRecordBatch(arrow.NewSchema(fields, &md), cols, rec.NumRows())
}
