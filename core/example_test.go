package core_test

import (
	"fmt"
	"unsafe"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native"
)

func ExampleNewTensor() {
	x, err := core.NewTensor([]float32{1, 2, 3, 4, 5, 6}, 2, 3)
	if err != nil {
		panic(err)
	}
	defer x.Close()
	v, _ := core.Data[float32](x) // a view of libtorch's memory, valid until Close
	fmt.Println(x, v)
	// Output: Tensor(float32, [2 3]) [1 2 3 4 5 6]
}

func ExampleFromBlob() {
	// Memory that libtorch may keep must be C memory, never the Go heap.
	buf := native.Malloc(4 * 8)
	vals := unsafe.Slice((*int64)(buf), 4)
	copy(vals, []int64{10, 20, 30, 40})
	x, err := core.FromBlob(buf, core.Int64, []int64{4}, nil, func() {
		native.FreeC(buf)
		fmt.Println("released")
	})
	if err != nil {
		panic(err)
	}
	p, _ := x.DataPtr()
	fmt.Println(x, p == buf)
	x.Close()
	// Output:
	// Tensor(int64, [4]) true
	// released
}

func ExampleTensor_To() {
	x, _ := core.NewTensor([]float64{0.5, 1.25})
	defer x.Close()
	h, _ := x.To(core.Float16)
	defer h.Close()
	v, _ := core.Data[core.Half](h)
	fmt.Println(h, v[0].Float32(), v[1].Float32())
	// Output: Tensor(float16, [2]) 0.5 1.25
}
