package repository

import (
	"encoding/binary"
	"math"
	"testing"

	yaml "go.yaml.in/yaml/v3"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
)

func lengthPrefixed(elems ...string) []byte {
	var b []byte
	for _, e := range elems {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(e)))
		b = append(b, e...)
	}
	return b
}

func TestSplitBytes(t *testing.T) {
	got, err := SplitBytes(lengthPrefixed("red", "", "blue"), 3)
	require.NoError(t, err)
	assert.Equal(t, [][]byte{[]byte("red"), {}, []byte("blue")}, got)
	for _, c := range []struct {
		raw  []byte
		n    int64
		want string
	}{
		{lengthPrefixed("red"), 2, "no 4-byte length"},
		{lengthPrefixed("red", "x"), 1, "bytes after"},
		{[]byte{255, 255, 255, 255, 'a'}, 1, "length 4294967295"},
		{nil, 1 << 40, "no 4-byte length"},
	} {
		_, err := SplitBytes(c.raw, c.n)
		require.ErrorContains(t, err, c.want)
	}
}

// FuzzSplitBytes: any bytes and count split without panicking, and what
// splits re-encodes to the same bytes.
func FuzzSplitBytes(f *testing.F) {
	f.Add(lengthPrefixed("red", "", "blue"), int64(3))
	f.Add([]byte{1, 0, 0}, int64(1))
	f.Add([]byte{}, int64(0))
	f.Fuzz(func(t *testing.T, raw []byte, n int64) {
		elems, err := SplitBytes(raw, n)
		if err != nil {
			return
		}
		var again []string
		for _, e := range elems {
			again = append(again, string(e))
		}
		if string(lengthPrefixed(again...)) != string(raw) || int64(len(elems)) != n {
			t.Fatalf("split %q into %d elements that re-encode differently", raw, len(elems))
		}
	})
}

// A package trained on a table with a category column installs as raw
// records: one input per column, the category column BYTES with its
// vocabulary; category strings map to their codes, unknown and empty
// ones to NaN.
func TestPackageConfigColumns(t *testing.T) {
	man := &modelpkg.Manifest{
		Inputs: []modelpkg.TensorInfo{{Name: "x", DType: "float32", Shape: []int64{-1, 2}, Columns: []data.FeatureInfo{
			{Name: "size", Scale: 1}, {Name: "colour", Categorical: true, Categories: []string{"blue", "green", "red"}}}}},
		Outputs: []modelpkg.TensorInfo{{Name: "y", DType: "float32", Shape: []int64{-1, 2}}},
		Labels:  []string{"large", "small"},
	}
	cfg, _, err := PackageConfig("m", man, 0)
	require.NoError(t, err)
	require.True(t, cfg.Columns)
	require.Len(t, cfg.Inputs, 2)
	assert.Equal(t, TensorSpec{Name: "size", DataType: FP32, Dims: []int64{1}}, cfg.Inputs[0])
	assert.Equal(t, Bytes, cfg.Inputs[1].DataType)
	assert.Equal(t, []string{"blue", "green", "red"}, cfg.Inputs[1].Categories)
	codes := cfg.Inputs[1].Codes([][]byte{[]byte("red"), []byte("purple"), nil, []byte("blue")})
	var v []float32
	for i := 0; i < len(codes); i += 4 {
		v = append(v, math.Float32frombits(binary.LittleEndian.Uint32(codes[i:])))
	}
	assert.Equal(t, float32(2), v[0])
	assert.True(t, math.IsNaN(float64(v[1])) && math.IsNaN(float64(v[2])), "unknown and empty are NaN")
	assert.Equal(t, float32(0), v[3])

	// The config round-trips through YAML, and bad column configs are refused.
	b, err := yaml.Marshal(cfg)
	require.NoError(t, err)
	back, err := ParseConfig(b, false)
	require.NoError(t, err)
	assert.True(t, back.Columns)
	assert.Equal(t, cfg.Inputs[1].Categories, back.Inputs[1].Categories)
	for _, bad := range []string{
		"max_batch_size: 8\ncolumns: true\ninputs: [{name: c, datatype: BYTES, dims: [1]}]\noutputs: [{name: y, datatype: FP32, dims: [1]}]\n",
		"max_batch_size: 8\ncolumns: true\ninputs: [{name: c, datatype: INT64, dims: [1]}]\noutputs: [{name: y, datatype: FP32, dims: [1]}]\n",
		"max_batch_size: 8\ncolumns: true\ninputs: [{name: c, datatype: FP32, dims: [2]}]\noutputs: [{name: y, datatype: FP32, dims: [1]}]\n",
		"max_batch_size: 0\ncolumns: true\ninputs: [{name: c, datatype: FP32, dims: [1]}]\noutputs: [{name: y, datatype: FP32, dims: [1]}]\n",
		"max_batch_size: 8\ninputs: [{name: c, datatype: FP32, dims: [1], categories: [a]}]\noutputs: [{name: y, datatype: FP32, dims: [1]}]\n",
	} {
		_, err := ParseConfig([]byte(bad), false)
		require.Error(t, err, bad)
	}
}
