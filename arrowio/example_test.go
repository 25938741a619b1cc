package arrowio_test

import (
	"fmt"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
)

func ExampleNewFixedShapeTensorType() {
	typ, err := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, []int64{3, 224, 224},
		arrowio.DimNames("C", "H", "W"))
	if err != nil {
		panic(err)
	}
	fmt.Println(typ.StorageType())
	fmt.Println(typ.Serialize())
	// Output:
	// fixed_size_list<item: float32, nullable>[150528]
	// {"shape":[3,224,224],"dim_names":["C","H","W"]}
}

func ExampleArrayToTensor() {
	// Arrays built with an arrowio.Allocator live in C memory, so the
	// tensor points at the Arrow buffer instead of copying it.
	mem := arrowio.NewAllocator()
	b := array.NewFloat32Builder(mem)
	b.AppendValues([]float32{1, 2, 3, 4, 5, 6}, nil)
	values := b.NewArray()
	b.Release()
	defer values.Release()
	typ, _ := arrowio.NewFixedShapeTensorType(arrow.PrimitiveTypes.Float32, []int64{3})
	col, err := arrowio.NewFixedShapeTensorArray(typ, values)
	if err != nil {
		panic(err)
	}
	defer col.Release()

	x, err := arrowio.ArrayToTensor(col, arrowio.NoCopy())
	if err != nil {
		panic(err)
	}
	defer x.Close()
	fmt.Println(x)

	// And back: the array's buffer is the tensor's memory.
	out, err := arrowio.TensorToArray(x)
	if err != nil {
		panic(err)
	}
	defer out.Release()
	fmt.Println(out.DataType())
	v, _ := core.Data[float32](x)
	fmt.Println(v)
	// Output:
	// Tensor(float32, [2 3])
	// extension<arrow.fixed_shape_tensor[value_type=float32, shape=[3]]>
	// [1 2 3 4 5 6]
}
