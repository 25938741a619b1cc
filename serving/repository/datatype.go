package repository

import (
	"fmt"

	"github.com/kilnml/kiln/core"
)

// DataType is a tensor element type named as the KServe v2 protocol names
// it: "FP32", "INT64", "BYTES", ...
type DataType string

// The v2 datatypes. Kiln's TorchScript models take and return every one of
// them except the unsigned types wider than a byte and BYTES, which only
// appears as the output of the classification extension.
const (
	Bool   DataType = "BOOL"
	Uint8  DataType = "UINT8"
	Uint16 DataType = "UINT16"
	Uint32 DataType = "UINT32"
	Uint64 DataType = "UINT64"
	Int8   DataType = "INT8"
	Int16  DataType = "INT16"
	Int32  DataType = "INT32"
	Int64  DataType = "INT64"
	FP16   DataType = "FP16"
	FP32   DataType = "FP32"
	FP64   DataType = "FP64"
	BF16   DataType = "BF16"
	Bytes  DataType = "BYTES"
)

var toDType = map[DataType]core.DType{
	Bool: core.Bool, Uint8: core.Uint8, Int8: core.Int8, Int16: core.Int16,
	Int32: core.Int32, Int64: core.Int64, FP16: core.Float16, FP32: core.Float32,
	FP64: core.Float64, BF16: core.BFloat16,
}

var allTypes = map[DataType]bool{
	Bool: true, Uint8: true, Uint16: true, Uint32: true, Uint64: true, Int8: true,
	Int16: true, Int32: true, Int64: true, FP16: true, FP32: true, FP64: true,
	BF16: true, Bytes: true,
}

// Known reports whether d is one of the protocol's datatypes.
func (d DataType) Known() bool { return allTypes[d] }

// DType returns the tensor element type that holds d, and false when
// libtorch has none (UINT16, UINT32, UINT64, BYTES).
func (d DataType) DType() (core.DType, bool) {
	t, ok := toDType[d]
	return t, ok
}

// Size returns the size of one element in bytes; 0 for BYTES (variable) and
// unknown types.
func (d DataType) Size() int {
	switch d {
	case Bool, Uint8, Int8:
		return 1
	case Uint16, Int16, FP16, BF16:
		return 2
	case Uint32, Int32, FP32:
		return 4
	case Uint64, Int64, FP64:
		return 8
	}
	return 0
}

// FromDType returns the v2 datatype of a tensor element type.
func FromDType(t core.DType) (DataType, error) {
	for d, dt := range toDType {
		if dt == t {
			return d, nil
		}
	}
	return "", fmt.Errorf("no v2 datatype for %v", t)
}
