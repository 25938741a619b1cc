package arrowio

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// FixedShapeTensorName is the extension name of the canonical fixed shape
// tensor type, as written under the ARROW:extension:name metadata key.
const FixedShapeTensorName = "arrow.fixed_shape_tensor"

func init() {
	if err := arrow.RegisterExtensionType(prototype()); err != nil {
		panic(fmt.Sprintf("arrowio: registering %s: %v", FixedShapeTensorName, err))
	}
}

// prototype is the instance registered with arrow-go; readers only call its
// Deserialize and ExtensionName.
func prototype() *FixedShapeTensorType {
	return &FixedShapeTensorType{ExtensionBase: arrow.ExtensionBase{
		Storage: arrow.FixedSizeListOf(1, arrow.PrimitiveTypes.Float32),
	}}
}

// FixedShapeTensorType is the canonical Arrow extension type
// arrow.fixed_shape_tensor: each value is a tensor of one fixed shape,
// stored row-major in a FixedSizeList whose size is the product of the
// shape. It is what pyarrow calls pa.fixed_shape_tensor.
//
// The shape and dim names describe the physical, row-major layout. An
// optional permutation describes the logical layout: logical dimension i is
// physical dimension Permutation()[i], so a tensor stored as shape [4, 3]
// with permutation [1, 0] is logically a [3, 4] tensor (its transpose).
//
// A FixedShapeTensorType is immutable and safe for concurrent use.
type FixedShapeTensorType struct {
	arrow.ExtensionBase
	shape       []int64
	dimNames    []string
	permutation []int64
}

// TypeOption sets an optional parameter of a FixedShapeTensorType.
type TypeOption func(*FixedShapeTensorType)

// DimNames names the physical dimensions; there must be one name per
// dimension of the shape.
func DimNames(names ...string) TypeOption {
	return func(t *FixedShapeTensorType) { t.dimNames = slices.Clone(names) }
}

// Permutation sets the logical order of the dimensions: logical dimension i
// is physical dimension perm[i]. perm must be a permutation of 0..ndim-1.
func Permutation(perm ...int64) TypeOption {
	return func(t *FixedShapeTensorType) { t.permutation = slices.Clone(perm) }
}

// NewFixedShapeTensorType returns the type of tensors of valueType with
// the given physical shape (dimensions of each value, excluding the row
// dimension). The storage type is FixedSizeList<valueType>[product(shape)],
// with a nullable element field named "item", as pyarrow makes it.
func NewFixedShapeTensorType(valueType arrow.DataType, shape []int64, opts ...TypeOption) (*FixedShapeTensorType, error) {
	if valueType == nil {
		return nil, errors.New("arrowio: fixed_shape_tensor: nil value type")
	}
	t := &FixedShapeTensorType{shape: slices.Clone(shape)}
	if t.shape == nil {
		t.shape = []int64{}
	}
	for _, o := range opts {
		o(t)
	}
	n, err := t.validate()
	if err != nil {
		return nil, err
	}
	t.Storage = arrow.FixedSizeListOf(n, valueType)
	return t, nil
}

// validate checks shape, dim names and permutation and returns the list
// size the shape needs.
func (t *FixedShapeTensorType) validate() (int32, error) {
	size, err := listSize(t.shape)
	if err != nil {
		return 0, err
	}
	ndim := len(t.shape)
	if len(t.dimNames) > 0 && len(t.dimNames) != ndim {
		return 0, fmt.Errorf("arrowio: fixed_shape_tensor: %d dim_names for %d dimensions", len(t.dimNames), ndim)
	}
	if len(t.permutation) > 0 {
		if len(t.permutation) != ndim {
			return 0, fmt.Errorf("arrowio: fixed_shape_tensor: permutation %v for %d dimensions", t.permutation, ndim)
		}
		seen := make([]bool, ndim)
		for _, p := range t.permutation {
			if p < 0 || p >= int64(ndim) || seen[p] {
				return 0, fmt.Errorf("arrowio: fixed_shape_tensor: permutation %v is not a permutation of [0, %d)", t.permutation, ndim)
			}
			seen[p] = true
		}
	}
	return size, nil
}

// listSize returns the product of shape as a FixedSizeList size.
func listSize(shape []int64) (int32, error) {
	n := int64(1)
	for i, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("arrowio: fixed_shape_tensor: dimension %d of shape %v is negative", i, shape)
		}
		if d != 0 && n > math.MaxInt32/d {
			return 0, fmt.Errorf("arrowio: fixed_shape_tensor: shape %v holds more than %d elements", shape, math.MaxInt32)
		}
		n *= d
	}
	return int32(n), nil
}

// ArrayType returns the Go type of arrays of this type, for arrow-go.
func (*FixedShapeTensorType) ArrayType() reflect.Type { return reflect.TypeOf(FixedShapeTensorArray{}) }

// ExtensionName returns "arrow.fixed_shape_tensor".
func (*FixedShapeTensorType) ExtensionName() string { return FixedShapeTensorName }

// ValueType returns the type of the tensor elements.
func (t *FixedShapeTensorType) ValueType() arrow.DataType {
	return t.Storage.(*arrow.FixedSizeListType).Elem()
}

// Shape returns a copy of the physical shape of each value.
func (t *FixedShapeTensorType) Shape() []int64 { return slices.Clone(t.shape) }

// NDim returns the number of dimensions of each value.
func (t *FixedShapeTensorType) NDim() int { return len(t.shape) }

// DimNames returns a copy of the dimension names, or nil when none are set.
func (t *FixedShapeTensorType) DimNames() []string { return slices.Clone(t.dimNames) }

// Permutation returns a copy of the permutation, or nil when none is set.
func (t *FixedShapeTensorType) Permutation() []int64 { return slices.Clone(t.permutation) }

// LogicalShape returns the shape of each value in its logical layout:
// the physical shape reordered by the permutation.
func (t *FixedShapeTensorType) LogicalShape() []int64 {
	if len(t.permutation) == 0 {
		return t.Shape()
	}
	out := make([]int64, len(t.shape))
	for i, p := range t.permutation {
		out[i] = t.shape[p]
	}
	return out
}

// trivialPermutation reports whether p leaves the dimensions in order.
func trivialPermutation(p []int64) bool {
	for i, v := range p {
		if v != int64(i) {
			return false
		}
	}
	return true
}

// ExtensionEquals reports whether other is a fixed shape tensor type with
// the same storage, shape and dim names and an equivalent permutation (a
// missing permutation equals the identity), as Arrow C++ defines it.
func (t *FixedShapeTensorType) ExtensionEquals(other arrow.ExtensionType) bool {
	o, ok := other.(*FixedShapeTensorType)
	if !ok {
		return false
	}
	permEq := slices.Equal(t.permutation, o.permutation) ||
		(trivialPermutation(t.permutation) && trivialPermutation(o.permutation))
	return arrow.TypeEqual(t.Storage, o.Storage) && slices.Equal(t.shape, o.shape) &&
		slices.Equal(t.dimNames, o.dimNames) && permEq
}

// String describes the type the way pyarrow does, e.g.
// "extension<arrow.fixed_shape_tensor[value_type=float32, shape=[2,3]]>".
func (t *FixedShapeTensorType) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "extension<%s[value_type=%s, shape=%s", FixedShapeTensorName, t.ValueType(), intList(t.shape))
	if len(t.dimNames) > 0 {
		fmt.Fprintf(&b, ", dim_names=[%s]", strings.Join(t.dimNames, ","))
	}
	if len(t.permutation) > 0 {
		fmt.Fprintf(&b, ", permutation=%s", intList(t.permutation))
	}
	b.WriteString("]>")
	return b.String()
}

func intList(v []int64) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, x := range v {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(x, 10))
	}
	b.WriteByte(']')
	return b.String()
}

// Serialize returns the ARROW:extension:metadata value: a compact JSON
// object with "shape", then "permutation" and "dim_names" when set, byte for
// byte what Arrow C++ and pyarrow write, e.g.
// {"shape":[4,3],"permutation":[1,0],"dim_names":["W","H"]}.
func (t *FixedShapeTensorType) Serialize() string {
	var b bytes.Buffer
	b.WriteString(`{"shape":`)
	b.WriteString(intList(t.shape))
	if len(t.permutation) > 0 {
		b.WriteString(`,"permutation":`)
		b.WriteString(intList(t.permutation))
	}
	if len(t.dimNames) > 0 {
		b.WriteString(`,"dim_names":[`)
		for i, n := range t.dimNames {
			if i > 0 {
				b.WriteByte(',')
			}
			writeJSONString(&b, n)
		}
		b.WriteByte(']')
	}
	b.WriteByte('}')
	return b.String()
}

// writeJSONString writes s as a JSON string without HTML escaping, as
// RapidJSON (Arrow C++) does.
func writeJSONString(b *bytes.Buffer, s string) {
	enc := json.NewEncoder(b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)       // cannot fail for a string
	b.Truncate(b.Len() - 1) // Encode appends a newline
}

// Deserialize parses ARROW:extension:metadata for storage type storage.
// It accepts what Arrow C++ accepts: a JSON object with a "shape" array of
// non-negative integers and optional "dim_names" (strings, one per
// dimension) and "permutation" (a permutation of 0..ndim-1); other keys are
// ignored. storage must be a FixedSizeList whose size is the product of the
// shape.
func (*FixedShapeTensorType) Deserialize(storage arrow.DataType, data string) (arrow.ExtensionType, error) {
	fsl, ok := storage.(*arrow.FixedSizeListType)
	if !ok {
		return nil, fmt.Errorf("arrowio: %s: storage must be a fixed_size_list, got %v", FixedShapeTensorName, storage)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal([]byte(data), &obj); err != nil || obj == nil {
		return nil, fmt.Errorf("arrowio: %s: metadata %q is not a JSON object", FixedShapeTensorName, data)
	}
	raw, ok := obj["shape"]
	if !ok {
		return nil, fmt.Errorf("arrowio: %s: metadata %q lacks \"shape\"", FixedShapeTensorName, data)
	}
	t := &FixedShapeTensorType{}
	var err error
	if t.shape, err = intArray("shape", raw); err != nil {
		return nil, err
	}
	if raw, ok := obj["permutation"]; ok {
		if t.permutation, err = intArray("permutation", raw); err != nil {
			return nil, err
		}
	}
	if raw, ok := obj["dim_names"]; ok {
		if t.dimNames, err = stringArray("dim_names", raw); err != nil {
			return nil, err
		}
	}
	n, err := t.validate()
	if err != nil {
		return nil, err
	}
	if n != fsl.Len() {
		return nil, fmt.Errorf("arrowio: %s: shape %v holds %d elements, storage %v holds %d",
			FixedShapeTensorName, t.shape, n, storage, fsl.Len())
	}
	t.Storage = storage
	return t, nil
}

// intArray decodes a JSON array of integers; floats, nulls and other JSON
// values are errors.
func intArray(key string, raw json.RawMessage) ([]int64, error) {
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil || items == nil {
		return nil, fmt.Errorf("arrowio: %s: %q must be an array, got %s", FixedShapeTensorName, key, raw)
	}
	out := make([]int64, len(items))
	for i, it := range items {
		v, err := strconv.ParseInt(string(bytes.TrimSpace(it)), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("arrowio: %s: %q must contain integers, got %s", FixedShapeTensorName, key, it)
		}
		out[i] = v
	}
	return out, nil
}

// stringArray decodes a JSON array of strings.
func stringArray(key string, raw json.RawMessage) ([]string, error) {
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil || items == nil {
		return nil, fmt.Errorf("arrowio: %s: %q must be an array, got %s", FixedShapeTensorName, key, raw)
	}
	out := make([]string, len(items))
	for i, it := range items {
		if err := json.Unmarshal(it, &out[i]); err != nil || bytes.TrimSpace(it)[0] != '"' {
			return nil, fmt.Errorf("arrowio: %s: %q must contain strings, got %s", FixedShapeTensorName, key, it)
		}
	}
	return out, nil
}

// FixedShapeTensorArray is an array of arrow.fixed_shape_tensor values,
// with FixedSizeList storage.
type FixedShapeTensorArray struct {
	array.ExtensionArrayBase
}

// TensorType returns the array's type.
func (a *FixedShapeTensorArray) TensorType() *FixedShapeTensorType {
	return a.ExtensionType().(*FixedShapeTensorType)
}

// ListStorage returns the FixedSizeList storage; it stays owned by a.
func (a *FixedShapeTensorArray) ListStorage() *array.FixedSizeList {
	return a.Storage().(*array.FixedSizeList)
}

// NewFixedShapeTensorArray makes an array of type typ whose rows are
// consecutive runs of product(shape) elements of values, which must have
// typ's value type and a length divisible by that product. values' buffers
// are shared, not copied; the caller keeps its own reference to values and
// must Release the result.
func NewFixedShapeTensorArray(typ *FixedShapeTensorType, values arrow.Array) (*FixedShapeTensorArray, error) {
	if !arrow.TypeEqual(values.DataType(), typ.ValueType()) {
		return nil, fmt.Errorf("arrowio: new %s array: values are %v, the type holds %v", FixedShapeTensorName, values.DataType(), typ.ValueType())
	}
	n := int(typ.Storage.(*arrow.FixedSizeListType).Len())
	rows := 0
	switch {
	case n == 0 && values.Len() != 0:
		return nil, fmt.Errorf("arrowio: new %s array: shape %v holds no element, got %d values", FixedShapeTensorName, typ.shape, values.Len())
	case n > 0:
		if values.Len()%n != 0 {
			return nil, fmt.Errorf("arrowio: new %s array: %d values are not a whole number of %v tensors", FixedShapeTensorName, values.Len(), typ.shape)
		}
		rows = values.Len() / n
	}
	data := array.NewData(typ, rows, []*memory.Buffer{nil}, []arrow.ArrayData{values.Data()}, 0, 0)
	defer data.Release()
	return array.NewExtensionData(data).(*FixedShapeTensorArray), nil
}
