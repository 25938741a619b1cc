package grpcserver

import (
	"testing"

	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/repository"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	gproto "google.golang.org/protobuf/proto"
)

// varConfig is a model with one FP32 input of a variable dimension.
func varConfig() *repository.Config {
	return &repository.Config{
		Name:    "var",
		Inputs:  []repository.TensorSpec{{Name: "x", DataType: repository.FP32, Dims: []int64{-1}}},
		Outputs: []repository.TensorSpec{{Name: "y", DataType: repository.FP32, Dims: []int64{-1}}},
	}
}

// recordConfig is a raw-record model: a BYTES category column and an FP32
// one.
func recordConfig() *repository.Config {
	return &repository.Config{Name: "rec", MaxBatchSize: 4, Columns: true,
		Inputs: []repository.TensorSpec{{Name: "colour", DataType: repository.Bytes, Dims: []int64{1}, Categories: []string{"blue", "red"}},
			{Name: "size", DataType: repository.FP32, Dims: []int64{1}}},
		Outputs: []repository.TensorSpec{{Name: "y", DataType: repository.FP32, Dims: []int64{1}}}}
}

func wantInvalid(t *testing.T, err error) {
	t.Helper()
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("got %v, want INVALID_ARGUMENT", err)
	}
}

// A declared shape of 2^33 elements with no values must be refused by
// counting the values, not by allocating 32 GiB first (which died with
// "fatal error: out of memory").
func TestDecodeInputsHugeDeclaredShapeEmptyContents(t *testing.T) {
	req := &pb.ModelInferRequest{Inputs: []*pb.ModelInferRequest_InferInputTensor{{
		Name: "x", Datatype: "FP32", Shape: []int64{8589934592}, Contents: &pb.InferTensorContents{},
	}}}
	// Limits far above the shape: only the value count may refuse it.
	_, err := decodeInputs("var", varConfig(), req, decodeLimits{maxElements: 1 << 40})
	wantInvalid(t, err)
	_, err = decodeInputs("var", varConfig(), req, decodeLimits{})
	wantInvalid(t, err)
}

func TestDecodeInputsLimits(t *testing.T) {
	in := &pb.ModelInferRequest_InferInputTensor{Name: "x", Datatype: "FP32", Shape: []int64{3},
		Contents: &pb.InferTensorContents{Fp32Contents: []float32{1, 2, 3}}}
	req := &pb.ModelInferRequest{Inputs: []*pb.ModelInferRequest_InferInputTensor{in}}
	if _, err := decodeInputs("var", varConfig(), req, decodeLimits{}); err != nil {
		t.Fatal(err)
	}
	_, err := decodeInputs("var", varConfig(), req, decodeLimits{maxElements: 2})
	wantInvalid(t, err)
	two := &pb.ModelInferRequest{Inputs: []*pb.ModelInferRequest_InferInputTensor{in, in}}
	_, err = decodeInputs("var", varConfig(), two, decodeLimits{maxInputs: 1})
	wantInvalid(t, err)
}

// FuzzDecodeInputs decodes arbitrary ModelInferRequest messages against
// a variable-shape and a fixed-shape batched model: it must never panic
// nor allocate from a declared shape.
func FuzzDecodeInputs(f *testing.F) {
	seeds := []*pb.ModelInferRequest{
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{3},
			Contents: &pb.InferTensorContents{Fp32Contents: []float32{1, 2, 3}}}}},
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{2}}},
			RawInputContents: [][]byte{{0, 0, 128, 63, 0, 0, 0, 64}}},
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{8589934592},
			Contents: &pb.InferTensorContents{}}}},
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "b", Datatype: "BOOL", Shape: []int64{1, 2},
			Contents: &pb.InferTensorContents{BoolContents: []bool{true, false}}}}},
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{{Name: "b", Datatype: "INT8", Shape: []int64{1, 2},
			Contents: &pb.InferTensorContents{IntContents: []int32{1, 300}}}}},
		// Raw records: BYTES category strings, typed and raw.
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{
			{Name: "colour", Datatype: "BYTES", Shape: []int64{2, 1}, Contents: &pb.InferTensorContents{BytesContents: [][]byte{[]byte("red"), {}}}},
			{Name: "size", Datatype: "FP32", Shape: []int64{2, 1}, Contents: &pb.InferTensorContents{Fp32Contents: []float32{1, 2}}}}},
		{Inputs: []*pb.ModelInferRequest_InferInputTensor{
			{Name: "colour", Datatype: "BYTES", Shape: []int64{1, 1}}, {Name: "size", Datatype: "FP32", Shape: []int64{1, 1}}},
			RawInputContents: [][]byte{{4, 0, 0, 0, 'b', 'l', 'u', 'e'}, {0, 0, 128, 63}}},
	}
	for _, s := range seeds {
		b, err := gproto.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	batched := &repository.Config{Name: "b", MaxBatchSize: 4,
		Inputs:  []repository.TensorSpec{{Name: "b", DataType: repository.Bool, Dims: []int64{2}}},
		Outputs: []repository.TensorSpec{{Name: "y", DataType: repository.FP32, Dims: []int64{1}}}}
	int8s := &repository.Config{Name: "i", MaxBatchSize: 4,
		Inputs:  []repository.TensorSpec{{Name: "b", DataType: repository.Int8, Dims: []int64{-1}}},
		Outputs: []repository.TensorSpec{{Name: "y", DataType: repository.FP32, Dims: []int64{1}}}}
	lim := decodeLimits{maxElements: 1 << 20}
	f.Fuzz(func(t *testing.T, msg []byte) {
		req := new(pb.ModelInferRequest)
		if err := gproto.Unmarshal(msg, req); err != nil {
			return
		}
		for _, cfg := range []*repository.Config{varConfig(), batched, int8s, recordConfig()} {
			ins, err := decodeInputs(cfg.Name, cfg, req, lim)
			if err != nil {
				if status.Code(err) != codes.InvalidArgument {
					t.Fatalf("error without INVALID_ARGUMENT: %v", err)
				}
				continue
			}
			for i, in := range ins {
				n := int64(1)
				for _, d := range in.Shape {
					n *= d
				}
				if int64(len(in.Data)) != n*int64(in.DType.Size()) {
					t.Fatalf("input %d: %d bytes for shape %v of %v", i, len(in.Data), in.Shape, in.DType)
				}
			}
		}
	})
}
