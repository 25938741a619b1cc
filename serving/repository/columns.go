package repository

import (
	"encoding/binary"
	"fmt"
	"math"
)

// SplitBytes splits a KServe v2 BYTES tensor's raw contents (as Triton
// writes them: each element a 4-byte little-endian length, then that many
// bytes) into exactly n elements, which alias raw. Fewer or more bytes
// than n elements hold, or a length past the end, is an error naming the
// element. Nothing is sized by n before the bytes are seen.
func SplitBytes(raw []byte, n int64) ([][]byte, error) {
	if n < 0 {
		return nil, fmt.Errorf("%d elements", n)
	}
	out := make([][]byte, 0, min(n, int64(len(raw)/4)))
	rest := raw
	for i := int64(0); i < n; i++ {
		if len(rest) < 4 {
			return nil, fmt.Errorf("BYTES element %d: %d bytes left, no 4-byte length (the shape needs %d elements)", i, len(rest), n)
		}
		l := binary.LittleEndian.Uint32(rest)
		rest = rest[4:]
		if uint64(l) > uint64(len(rest)) {
			return nil, fmt.Errorf("BYTES element %d: length %d, but %d bytes are left", i, l, len(rest))
		}
		out = append(out, rest[:l:l])
		rest = rest[l:]
	}
	if len(rest) > 0 {
		return nil, fmt.Errorf("BYTES: %d bytes after the %d elements the shape holds", len(rest), n)
	}
	return out, nil
}

// Code is a category's index in t.Categories as a float32, or NaN for an
// unknown or empty (null) one: the value a Kiln package's forward takes
// for a categorical column.
func (t *TensorSpec) Code(s []byte) float32 {
	if len(s) == 0 {
		return float32(math.NaN())
	}
	idx := t.index
	if idx == nil { // not validated: a config built in code
		idx = categoryIndex(t.Categories)
	}
	if k, ok := idx[string(s)]; ok {
		return float32(k)
	}
	return float32(math.NaN())
}

// Codes maps BYTES elements to little-endian float32 category codes (see
// Code).
func (t *TensorSpec) Codes(elems [][]byte) []byte {
	out := make([]byte, 0, 4*len(elems))
	for _, e := range elems {
		out = binary.LittleEndian.AppendUint32(out, math.Float32bits(t.Code(e)))
	}
	return out
}

func categoryIndex(cats []string) map[string]int {
	m := make(map[string]int, len(cats))
	for k, c := range cats {
		m[c] = k
	}
	return m
}
