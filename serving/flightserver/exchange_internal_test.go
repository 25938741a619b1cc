package flightserver

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestPermuteRows(t *testing.T) {
	// Rows of physical shape [2,3,4]; logical dimension i is physical
	// perm[i], so logical shape [4,2,3].
	phys, perm := []int64{2, 3, 4}, []int64{2, 0, 1}
	const rows, n = 3, 24
	src := make([]byte, rows*n*4)
	for i := range rows * n {
		binary.LittleEndian.PutUint32(src[4*i:], uint32(i))
	}
	out := make([]byte, len(src))
	permuteRows(out, src, rows, phys, perm, 4)
	for r := range rows {
		e := 0
		for a := range 4 { // logical dims: physical 2, 0, 1
			for b := range 2 {
				for c := range 3 {
					want := uint32(r*n + b*12 + c*4 + a) // physical (b, c, a)
					got := binary.LittleEndian.Uint32(out[4*(r*n+e):])
					require.Equal(t, want, got, "row %d logical (%d,%d,%d)", r, a, b, c)
					e++
				}
			}
		}
	}
}
