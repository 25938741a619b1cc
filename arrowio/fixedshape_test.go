package arrowio

import (
	"bytes"
	"strings"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

func mustType(t *testing.T, vt arrow.DataType, shape []int64, opts ...TypeOption) *FixedShapeTensorType {
	t.Helper()
	typ, err := NewFixedShapeTensorType(vt, shape, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return typ
}

// The expected strings are what pyarrow 25 writes for the same types
// (pa.schema([pa.field("x", pa.fixed_shape_tensor(...))]).serialize()).
func TestSerializeMatchesPyarrow(t *testing.T) {
	f32 := arrow.PrimitiveTypes.Float32
	cases := []struct {
		typ  *FixedShapeTensorType
		want string
	}{
		{mustType(t, f32, []int64{2, 3}, DimNames("a", "b"), Permutation(1, 0)), `{"shape":[2,3],"permutation":[1,0],"dim_names":["a","b"]}`},
		{mustType(t, arrow.PrimitiveTypes.Int64, []int64{2, 3}), `{"shape":[2,3]}`},
		{mustType(t, arrow.PrimitiveTypes.Int64, nil), `{"shape":[]}`},
		{mustType(t, arrow.PrimitiveTypes.Int64, []int64{3, 1}, DimNames("é\"x", "y")), `{"shape":[3,1],"dim_names":["é\"x","y"]}`},
		{mustType(t, f32, []int64{1}, DimNames("<&>")), `{"shape":[1],"dim_names":["<&>"]}`},
	}
	for _, c := range cases {
		if got := c.typ.Serialize(); got != c.want {
			t.Errorf("%v: Serialize() = %s, want %s", c.typ, got, c.want)
		}
		back, err := c.typ.Deserialize(c.typ.StorageType(), c.typ.Serialize())
		if err != nil {
			t.Errorf("%v: Deserialize(Serialize()): %v", c.typ, err)
			continue
		}
		if !c.typ.ExtensionEquals(back.(arrow.ExtensionType)) || !arrow.TypeEqual(c.typ, back) {
			t.Errorf("round trip changed %v into %v", c.typ, back)
		}
	}
}

func TestNewTypeValidates(t *testing.T) {
	f32 := arrow.PrimitiveTypes.Float32
	typ := mustType(t, f32, []int64{2, 3, 4}, DimNames("C", "H", "W"), Permutation(2, 0, 1))
	if got := typ.StorageType().(*arrow.FixedSizeListType).Len(); got != 24 {
		t.Errorf("list size %d, want 24", got)
	}
	if got := typ.LogicalShape(); !equalInts(got, []int64{4, 2, 3}) {
		t.Errorf("logical shape %v, want [4 2 3]", got)
	}
	if got := typ.String(); got != "extension<arrow.fixed_shape_tensor[value_type=float32, shape=[2,3,4], dim_names=[C,H,W], permutation=[2,0,1]]>" {
		t.Errorf("String() = %s", got)
	}
	bad := []struct {
		shape []int64
		opts  []TypeOption
		msg   string
	}{
		{[]int64{2, -1}, nil, "negative"},
		{[]int64{1 << 20, 1 << 20}, nil, "more than"},
		{[]int64{2, 3}, []TypeOption{DimNames("a")}, "1 dim_names for 2 dimensions"},
		{[]int64{2, 3}, []TypeOption{Permutation(0)}, "permutation [0] for 2 dimensions"},
		{[]int64{2, 3}, []TypeOption{Permutation(0, 0)}, "not a permutation"},
		{[]int64{2, 3}, []TypeOption{Permutation(1, 2)}, "not a permutation"},
	}
	for _, b := range bad {
		_, err := NewFixedShapeTensorType(f32, b.shape, b.opts...)
		if err == nil || !strings.Contains(err.Error(), b.msg) {
			t.Errorf("shape %v: error %v, want one mentioning %q", b.shape, err, b.msg)
		}
	}
	if _, err := NewFixedShapeTensorType(nil, []int64{1}); err == nil {
		t.Error("nil value type accepted")
	}
}

// Deserialize accepts and rejects what Arrow C++ (pyarrow 25) does.
func TestDeserializeLikePyarrow(t *testing.T) {
	storage := arrow.FixedSizeListOf(6, arrow.PrimitiveTypes.Float32)
	ok := map[string][]int64{
		`{"shape":[2,3], "extra":1}`: {2, 3},
		`{ "shape" : [ 3 , 2 ] }`:    {3, 2},
		`{"shape":[6]}`:              {6},
	}
	for md, shape := range ok {
		got, err := prototype().Deserialize(storage, md)
		if err != nil {
			t.Errorf("%s: %v", md, err)
			continue
		}
		if s := got.(*FixedShapeTensorType).Shape(); !equalInts(s, shape) {
			t.Errorf("%s: shape %v, want %v", md, s, shape)
		}
	}
	bad := map[string]string{
		`{"shape":[2,3],"permutation":[0,0]}`: "not a permutation",
		`{"shape":[2,3],"dim_names":["a"]}`:   "dim_names",
		`{"shape":[2,4]}`:                     "holds 8 elements",
		`{"shape":[-2,-3]}`:                   "negative",
		`{}`:                                  `lacks "shape"`,
		`{"shape":[2,3],"dim_names":[1,2]}`:   "must contain strings",
		`{"shape":[2.0,3]}`:                   "must contain integers",
		`{"shape":[2,3],"permutation":[1]}`:   "permutation [1] for 2",
		`{"shape":[2,3],"permutation":[1,2]}`: "not a permutation",
		`{"shape":[6],"permutation":null}`:    "must be an array",
		`{"shape":"6"}`:                       "must be an array",
		`[6]`:                                 "not a JSON object",
		``:                                    "not a JSON object",
		`{"shape":[6]`:                        "not a JSON object",
		`{"shape":[6],"dim_names":"a"}`:       "must be an array",
		`{"shape":[9223372036854775808]}`:     "must contain integers",
	}
	for md, msg := range bad {
		_, err := prototype().Deserialize(storage, md)
		if err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: error %v, want one mentioning %q", md, err, msg)
		}
	}
	if _, err := prototype().Deserialize(arrow.ListOf(arrow.PrimitiveTypes.Float32), `{"shape":[6]}`); err == nil {
		t.Error("variable-size list storage accepted")
	}
}

func TestExtensionEquals(t *testing.T) {
	f32, f64 := arrow.PrimitiveTypes.Float32, arrow.PrimitiveTypes.Float64
	a := mustType(t, f32, []int64{2, 3})
	same := []arrow.ExtensionType{mustType(t, f32, []int64{2, 3}), mustType(t, f32, []int64{2, 3}, Permutation(0, 1))}
	diff := []arrow.ExtensionType{
		mustType(t, f64, []int64{2, 3}), mustType(t, f32, []int64{3, 2}), mustType(t, f32, []int64{6}),
		mustType(t, f32, []int64{2, 3}, DimNames("a", "b")), mustType(t, f32, []int64{2, 3}, Permutation(1, 0)),
	}
	for _, o := range same {
		if !a.ExtensionEquals(o) {
			t.Errorf("%v != %v", a, o)
		}
	}
	for _, o := range diff {
		if a.ExtensionEquals(o) {
			t.Errorf("%v == %v", a, o)
		}
	}
}

func TestRegistered(t *testing.T) {
	if _, ok := arrow.GetExtensionType(FixedShapeTensorName).(*FixedShapeTensorType); !ok {
		t.Fatalf("%s is not registered", FixedShapeTensorName)
	}
}

// An IPC stream keeps the type, its parameters and the values.
func TestIPCRoundTrip(t *testing.T) {
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	defer mem.AssertSize(t, 0)
	typ := mustType(t, arrow.PrimitiveTypes.Float32, []int64{3, 2}, DimNames("W", "H"), Permutation(1, 0))
	vb := array.NewFloat32Builder(mem)
	for i := range 18 {
		vb.Append(float32(i) / 2)
	}
	values := vb.NewArray()
	vb.Release()
	defer values.Release()
	arr, err := NewFixedShapeTensorArray(typ, values)
	if err != nil {
		t.Fatal(err)
	}
	defer arr.Release()
	if arr.Len() != 3 {
		t.Fatalf("%d rows, want 3", arr.Len())
	}
	sliced := array.NewSlice(arr, 1, 3)
	defer sliced.Release()
	schema := arrow.NewSchema([]arrow.Field{{Name: "x", Type: typ, Nullable: true}}, nil)
	rec := array.NewRecordBatch(schema, []arrow.Array{sliced}, 2)
	defer rec.Release()

	var buf bytes.Buffer
	w := ipc.NewWriter(&buf, ipc.WithSchema(schema), ipc.WithAllocator(mem))
	if err := w.Write(rec); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(buf.Bytes(), []byte(`{"shape":[3,2],"permutation":[1,0],"dim_names":["W","H"]}`)) {
		t.Error("the stream lacks the canonical metadata")
	}
	r, err := ipc.NewReader(&buf, ipc.WithAllocator(mem))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Release()
	if !r.Next() {
		t.Fatalf("no batch: %v", r.Err())
	}
	got := r.RecordBatch()
	col, ok := got.Column(0).(*FixedShapeTensorArray)
	if !ok {
		t.Fatalf("read back %T (%v)", got.Column(0), got.Column(0).DataType())
	}
	if !typ.ExtensionEquals(col.TensorType()) || !equalStrings(col.TensorType().DimNames(), []string{"W", "H"}) {
		t.Errorf("read back type %v, want %v", col.TensorType(), typ)
	}
	if !array.Equal(col, sliced) {
		t.Errorf("read back %v, want %v", col, sliced)
	}
	vals := col.ListStorage().ListValues().(*array.Float32).Float32Values()
	if len(vals) != 12 || vals[0] != 3 || vals[11] != 8.5 {
		t.Errorf("values %v, want 3 .. 8.5", vals)
	}
}

func TestNewFixedShapeTensorArrayChecks(t *testing.T) {
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	defer mem.AssertSize(t, 0)
	b := array.NewInt32Builder(mem)
	b.AppendValues([]int32{1, 2, 3, 4, 5}, nil)
	values := b.NewArray()
	b.Release()
	defer values.Release()
	if _, err := NewFixedShapeTensorArray(mustType(t, arrow.PrimitiveTypes.Int32, []int64{2}), values); err == nil || !strings.Contains(err.Error(), "whole number") {
		t.Errorf("5 values as [2] tensors: %v", err)
	}
	if _, err := NewFixedShapeTensorArray(mustType(t, arrow.PrimitiveTypes.Int64, []int64{5}), values); err == nil || !strings.Contains(err.Error(), "values are int32") {
		t.Errorf("int32 values for an int64 type: %v", err)
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func equalStrings(a, b []string) bool {
	return strings.Join(a, "\x00") == strings.Join(b, "\x00") && len(a) == len(b)
}
