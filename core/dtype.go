package core

import (
	"fmt"
	"math"
	"strings"

	"github.com/kilnml/kiln/native"
)

// DType is a tensor element type.
type DType int32

// The element types Kiln moves across the C ABI.
const (
	Float32  = DType(native.Float32)
	Float64  = DType(native.Float64)
	Int64    = DType(native.Int64)
	Int32    = DType(native.Int32)
	Int16    = DType(native.Int16)
	Int8     = DType(native.Int8)
	Uint8    = DType(native.Uint8)
	Bool     = DType(native.Bool)
	Float16  = DType(native.Float16)
	BFloat16 = DType(native.BFloat16)
)

var dtypeInfo = map[DType]struct {
	name string
	size int
}{
	Float32: {"float32", 4}, Float64: {"float64", 8}, Int64: {"int64", 8},
	Int32: {"int32", 4}, Int16: {"int16", 2}, Int8: {"int8", 1}, Uint8: {"uint8", 1},
	Bool: {"bool", 1}, Float16: {"float16", 2}, BFloat16: {"bfloat16", 2},
}

// String returns the PyTorch-style name, e.g. "float32".
func (d DType) String() string {
	if i, ok := dtypeInfo[d]; ok {
		return i.name
	}
	return fmt.Sprintf("DType(%d)", int32(d))
}

// Size returns the size of one element in bytes (0 for an unknown type).
func (d DType) Size() int { return dtypeInfo[d].size }

// Valid reports whether d is a known element type.
func (d DType) Valid() bool { _, ok := dtypeInfo[d]; return ok }

// ParseDType parses a PyTorch-style name ("float32", "int64", "half", ...).
func ParseDType(s string) (DType, error) {
	switch strings.ToLower(strings.TrimPrefix(s, "torch.")) {
	case "float32", "float", "fp32":
		return Float32, nil
	case "float64", "double", "fp64":
		return Float64, nil
	case "int64", "long":
		return Int64, nil
	case "int32", "int":
		return Int32, nil
	case "int16", "short":
		return Int16, nil
	case "int8":
		return Int8, nil
	case "uint8":
		return Uint8, nil
	case "bool":
		return Bool, nil
	case "float16", "half", "fp16":
		return Float16, nil
	case "bfloat16", "bf16":
		return BFloat16, nil
	}
	return 0, Errorf(InvalidArgument, "kiln: unknown dtype %q", s)
}

// Half is an IEEE 754 half-precision float, stored as its bits.
type Half uint16

// BHalf is a bfloat16, stored as its bits.
type BHalf uint16

// HalfFromFloat32 rounds f to the nearest half (ties to even).
func HalfFromFloat32(f float32) Half {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	switch {
	case exp == 0xff: // Inf or NaN
		if mant != 0 {
			return Half(sign | 0x7e00)
		}
		return Half(sign | 0x7c00)
	case exp-127+15 >= 0x1f: // overflow
		return Half(sign | 0x7c00)
	case exp-127+15 <= 0: // subnormal or zero
		e := exp - 127 + 15
		if e < -10 {
			return Half(sign)
		}
		mant |= 0x800000
		shift := uint32(14 - e)
		h := mant >> shift
		rem := mant & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return Half(sign | uint16(h))
	}
	e := uint16(exp-127+15) << 10
	h := uint32(e) | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // may carry into the exponent, which is still correct
	}
	return Half(uint32(sign) | h)
}

// Float32 widens h exactly.
func (h Half) Float32() float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch exp {
	case 0:
		if mant == 0 {
			return math.Float32frombits(sign)
		}
		// subnormal: normalize
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		mant &= 0x3ff
		return math.Float32frombits(sign | e<<23 | mant<<13)
	case 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// BHalfFromFloat32 rounds f to the nearest bfloat16 (ties to even).
func BHalfFromFloat32(f float32) BHalf {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN
		return BHalf(b>>16 | 0x40)
	}
	b += 0x7fff + (b>>16)&1
	return BHalf(b >> 16)
}

// Float32 widens b exactly.
func (b BHalf) Float32() float32 { return math.Float32frombits(uint32(b) << 16) }

// Element is a Go type that maps to a DType.
type Element interface {
	float32 | float64 | int64 | int32 | int16 | int8 | uint8 | bool | Half | BHalf
}

// DTypeOf returns the DType of Go element type T.
func DTypeOf[T Element]() DType {
	var z T
	switch any(z).(type) {
	case float32:
		return Float32
	case float64:
		return Float64
	case int64:
		return Int64
	case int32:
		return Int32
	case int16:
		return Int16
	case int8:
		return Int8
	case uint8:
		return Uint8
	case bool:
		return Bool
	case Half:
		return Float16
	case BHalf:
		return BFloat16
	}
	panic("unreachable")
}
