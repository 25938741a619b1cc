package grpcserver

import (
	"encoding/binary"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/batcher"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/repository"
)

// bytesElems splits length-prefixed BYTES elements.
func bytesElems(t *testing.T, b []byte) []string {
	var out []string
	for len(b) > 0 {
		require.GreaterOrEqual(t, len(b), 4)
		n := binary.LittleEndian.Uint32(b)
		out = append(out, string(b[4:4+n]))
		b = b[4+n:]
	}
	return out
}

func fp32(vals ...float32) batcher.Tensor {
	var b []byte
	for _, v := range vals {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
	}
	return batcher.Tensor{DType: core.Float32, Shape: []int64{int64(len(vals)), 1}, Data: b}
}

// A binary classifier's one value per row (a probability or a logit of
// labels[1]) classifies into both labels.
func TestClassifyBinary(t *testing.T) {
	labels := []string{"benign", "malignant"}
	shape, data, err := classify(fp32(0.9, 0.2), 1, labels, true, "probability")
	require.NoError(t, err)
	assert.Equal(t, []int64{2, 1}, shape)
	assert.Equal(t, []string{"0.900000:1:malignant", "0.800000:0:benign"}, bytesElems(t, data))

	_, data, err = classify(fp32(0, float32(math.Log(3))), 2, labels, true, "logit")
	require.NoError(t, err)
	assert.Equal(t, []string{"0.500000:0:benign", "0.500000:1:malignant", "0.750000:1:malignant", "0.250000:0:benign"},
		bytesElems(t, data))

	// Without binary, one value is one class.
	_, data, err = classify(fp32(0.9), 2, labels, true, "")
	require.NoError(t, err)
	assert.Equal(t, []string{"0.900000:0:benign"}, bytesElems(t, data))
}

func TestBinaryOutputConfig(t *testing.T) {
	cfg := &repository.Config{Name: "b", Platform: repository.Platform, MaxBatchSize: 8,
		Inputs:  []repository.TensorSpec{{Name: "x", DataType: repository.FP32, Dims: []int64{3}}},
		Outputs: []repository.TensorSpec{{Name: "y", DataType: repository.FP32, Dims: []int64{1}, Binary: "probability"}}}
	require.NoError(t, cfg.Validate())
	cfg.Outputs[0].Binary = "odds"
	require.ErrorContains(t, cfg.Validate(), "want logit or probability")
	cfg.Outputs[0].Binary, cfg.Outputs[0].Dims = "logit", []int64{2}
	require.ErrorContains(t, cfg.Validate(), "dims [1]")
}

// Raw-record BYTES columns decode to category codes, typed or raw; a
// wrong count, a truncated element or a wrong datatype is INVALID_ARGUMENT.
func TestDecodeRecordColumns(t *testing.T) {
	cfg := recordConfig()
	require.NoError(t, cfg.Validate())
	f32 := func(b []byte) []float32 {
		var v []float32
		for i := 0; i+4 <= len(b); i += 4 {
			v = append(v, math.Float32frombits(binary.LittleEndian.Uint32(b[i:])))
		}
		return v
	}
	raw := binary.LittleEndian.AppendUint32(nil, 3)
	raw = append(raw, "red"...)
	raw = binary.LittleEndian.AppendUint32(raw, 6)
	raw = append(raw, "purple"...)
	size := binary.LittleEndian.AppendUint32(nil, math.Float32bits(2))
	size = binary.LittleEndian.AppendUint32(size, math.Float32bits(float32(math.NaN())))
	req := &pb.ModelInferRequest{Inputs: []*pb.ModelInferRequest_InferInputTensor{
		{Name: "colour", Datatype: "BYTES", Shape: []int64{2, 1}}, {Name: "size", Datatype: "FP32", Shape: []int64{2, 1}}},
		RawInputContents: [][]byte{raw, size}}
	ins, err := decodeInputs("rec", cfg, req, decodeLimits{})
	require.NoError(t, err)
	codes := f32(ins[0].Data)
	assert.Equal(t, float32(1), codes[0])
	assert.True(t, math.IsNaN(float64(codes[1])), "unknown category")
	assert.Equal(t, core.Float32, ins[0].DType)

	typed := &pb.ModelInferRequest{Inputs: []*pb.ModelInferRequest_InferInputTensor{
		{Name: "colour", Datatype: "BYTES", Shape: []int64{1, 1}, Contents: &pb.InferTensorContents{BytesContents: [][]byte{[]byte("blue")}}},
		{Name: "size", Datatype: "FP32", Shape: []int64{1, 1}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1}}}}}
	ins, err = decodeInputs("rec", cfg, typed, decodeLimits{})
	require.NoError(t, err)
	assert.Equal(t, []float32{0}, f32(ins[0].Data))

	for _, bad := range []*pb.ModelInferRequest{
		{Inputs: req.Inputs, RawInputContents: [][]byte{raw[:9], size}},
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{
			{Name: "colour", Datatype: "BYTES", Shape: []int64{2, 1}, Contents: &pb.InferTensorContents{BytesContents: [][]byte{[]byte("blue")}}},
			{Name: "size", Datatype: "FP32", Shape: []int64{2, 1}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1, 2}}}}},
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{
			{Name: "colour", Datatype: "FP32", Shape: []int64{1, 1}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1}}},
			{Name: "size", Datatype: "FP32", Shape: []int64{1, 1}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1}}}}},
	} {
		_, err := decodeInputs("rec", cfg, bad, decodeLimits{})
		wantInvalid(t, err)
	}
}
