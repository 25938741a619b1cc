package arrowio

import (
	"testing"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/cdata"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// cStructs allocates a zeroed struct ArrowArray and struct ArrowSchema in
// C memory, as a foreign caller would, and returns their addresses.
func cStructs(t *testing.T) (arr, schema uintptr) {
	mem := NewAllocator()
	a := mem.Allocate(int(unsafe.Sizeof(cdata.CArrowArray{})))
	s := mem.Allocate(int(unsafe.Sizeof(cdata.CArrowSchema{})))
	t.Cleanup(func() { mem.Free(a); mem.Free(s) })
	return uintptr(unsafe.Pointer(&a[0])), uintptr(unsafe.Pointer(&s[0]))
}

// tensorRecord makes a batch with a fixed_shape_tensor column "x" of
// float32 [2, 3] tensors (values 0..) and an int64 column "id".
func tensorRecord(t *testing.T, mem memory.Allocator, rows int) (arrow.RecordBatch, *FixedShapeTensorType) {
	typ := mustType(t, arrow.PrimitiveTypes.Float32, []int64{2, 3}, DimNames("r", "c"))
	vals := float32s(mem, rows*6)
	defer vals.Release()
	x, err := NewFixedShapeTensorArray(typ, vals)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Release()
	ib := array.NewInt64Builder(mem)
	defer ib.Release()
	for i := range rows {
		ib.Append(int64(i))
	}
	id := ib.NewArray()
	defer id.Release()
	md := arrow.NewMetadata([]string{"origin"}, []string{"test"})
	schema := arrow.NewSchema([]arrow.Field{
		{Name: "x", Type: typ, Metadata: arrow.NewMetadata([]string{"unit"}, []string{"m"})},
		{Name: "id", Type: arrow.PrimitiveTypes.Int64},
	}, &md)
	return array.NewRecordBatch(schema, []arrow.Array{x, id}, int64(rows)), typ
}

// What a consumer without the extension type sees: the storage, whole,
// with the extension name and parameters on the field.
func TestExportRecordBatchCarriesExtensionMetadata(t *testing.T) {
	mem := cmem(t)
	rec, typ := tensorRecord(t, mem, 3)
	defer rec.Release()
	pa, ps := cStructs(t)
	if err := ExportRecordBatch(rec, pa, ps); err != nil {
		t.Fatal(err)
	}
	plain, err := cdata.ImportCRecordBatch(cdata.ArrayFromPtr(pa), cdata.SchemaFromPtr(ps))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Release()
	f := plain.Schema().Field(0)
	if !arrow.TypeEqual(f.Type, typ.StorageType()) {
		t.Errorf("exported type %v, want the storage %v", f.Type, typ.StorageType())
	}
	want := map[string]string{
		ipc.ExtensionTypeKeyName:     FixedShapeTensorName,
		ipc.ExtensionMetadataKeyName: `{"shape":[2,3],"dim_names":["r","c"]}`,
		"unit":                       "m",
	}
	for k, v := range want {
		if got, ok := f.Metadata.GetValue(k); !ok || got != v {
			t.Errorf("field metadata %s = %q, want %q", k, got, v)
		}
	}
	if !array.Equal(plain.Column(0), rec.Column(0).(*FixedShapeTensorArray).Storage()) {
		t.Errorf("exported storage %v, want %v", plain.Column(0), rec.Column(0))
	}
}

func TestRecordBatchRoundTrip(t *testing.T) {
	mem := cmem(t)
	full, typ := tensorRecord(t, mem, 4)
	rec := full.NewSlice(1, 4)
	full.Release()
	defer rec.Release()
	pa, ps := cStructs(t)
	if err := ExportRecordBatch(rec, pa, ps); err != nil {
		t.Fatal(err)
	}
	back, err := ImportRecordBatch(pa, ps)
	if err != nil {
		t.Fatal(err)
	}
	defer back.Release()
	if !back.Schema().Equal(rec.Schema()) {
		t.Errorf("schema %v, want %v", back.Schema(), rec.Schema())
	}
	col, ok := back.Column(0).(*FixedShapeTensorArray)
	if !ok || !col.TensorType().ExtensionEquals(typ) {
		t.Fatalf("column x is %T %v", back.Column(0), back.Column(0).DataType())
	}
	if !array.RecordEqual(back, rec) {
		t.Errorf("imported %v, want %v", back, rec)
	}
	// The imported column is known C memory and becomes a tensor in place.
	x, err := ArrayToTensor(col, NoCopy())
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	orig := rec.Column(0).(*FixedShapeTensorArray).ListStorage().ListValues().Data()
	if got, want := dataPtr(t, x), valuesAddr(orig, 6); got != want {
		t.Errorf("tensor at %#x, the exported buffer at %#x", got, want)
	}
}

func TestArrayRoundTrip(t *testing.T) {
	mem := cmem(t)
	rec, typ := tensorRecord(t, mem, 2)
	defer rec.Release()
	for _, col := range rec.Columns() {
		pa, ps := cStructs(t)
		if err := ExportArray(col, "col", pa, ps); err != nil {
			t.Fatal(err)
		}
		f, back, err := ImportArray(pa, ps)
		if err != nil {
			t.Fatal(err)
		}
		if f.Name != "col" || !arrow.TypeEqual(f.Type, col.DataType()) || f.Metadata.Len() != 0 {
			t.Errorf("imported field %v, want col: %v without metadata", f, col.DataType())
		}
		if !array.Equal(back, col) {
			t.Errorf("imported %v, want %v", back, col)
		}
		back.Release()
	}
	// Without the extension type, a consumer sees storage and metadata.
	pa, ps := cStructs(t)
	if err := ExportArray(rec.Column(0), "x", pa, ps); err != nil {
		t.Fatal(err)
	}
	f, plain, err := cdata.ImportCArray(cdata.ArrayFromPtr(pa), cdata.SchemaFromPtr(ps))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Release()
	if name, _ := f.Metadata.GetValue(ipc.ExtensionTypeKeyName); name != FixedShapeTensorName || !arrow.TypeEqual(f.Type, typ.StorageType()) {
		t.Errorf("plain import: %v", f)
	}
	if plain.(*array.FixedSizeList).ListValues().Len() != 12 {
		t.Errorf("the storage's values were not exported: %v", plain)
	}
}

func TestImportRejects(t *testing.T) {
	if _, _, err := ImportArray(0, 0); err == nil {
		t.Error("nil pointers accepted")
	}
	if _, err := ImportRecordBatch(0, 1); err == nil {
		t.Error("nil array pointer accepted")
	}
	// A field naming the extension with metadata that does not fit its
	// storage is an error, not a silently wrong type.
	mem := cmem(t)
	vals := float32s(mem, 4)
	defer vals.Release()
	bad, err := NewFixedShapeTensorArray(mustType(t, arrow.PrimitiveTypes.Float32, []int64{2}), vals)
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Release()
	md := arrow.NewMetadata([]string{ipc.ExtensionTypeKeyName, ipc.ExtensionMetadataKeyName}, []string{FixedShapeTensorName, `{"shape":[3]}`})
	schema := arrow.NewSchema([]arrow.Field{{Name: "x", Type: bad.Storage().DataType(), Metadata: md}}, nil)
	rec := array.NewRecordBatch(schema, []arrow.Array{bad.Storage()}, 2)
	defer rec.Release()
	pa, ps := cStructs(t)
	if err := ExportRecordBatch(rec, pa, ps); err != nil {
		t.Fatal(err)
	}
	if _, err := ImportRecordBatch(pa, ps); err == nil {
		t.Error("shape [3] over fixed_size_list[2] accepted")
	}
}
