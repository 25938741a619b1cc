package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"

	pb "github.com/kilnml/kiln/serving/inferencepb"
	"google.golang.org/grpc"
)

// floorService answers ModelInfer and ModelStreamInfer with one prebuilt
// response (a [1, 10] FP32 output of zeros, what checkResponse expects)
// and runs no model: its CPU per request is what grpc-go and protobuf
// cost for the benchmark's messages on their own.
type floorService struct {
	pb.UnimplementedGRPCInferenceServiceServer
	resp *pb.ModelInferResponse
}

// ModelInfer returns the prebuilt response.
func (f *floorService) ModelInfer(context.Context, *pb.ModelInferRequest) (*pb.ModelInferResponse, error) {
	return f.resp, nil
}

// ModelStreamInfer answers every message of the stream with the prebuilt
// response, in order.
func (f *floorService) ModelStreamInfer(stream pb.GRPCInferenceService_ModelStreamInferServer) error {
	answer := &pb.ModelStreamInferResponse{InferResponse: f.resp}
	for {
		if _, err := stream.Recv(); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		if err := stream.Send(answer); err != nil {
			return err
		}
	}
}

// serveFloor is the -serve-child -servers floor mode: a plain grpc-go
// server (default options, no interceptors) with floorService on a
// loopback port; it prints "GRPC_ADDR - 0 0" on one line, like
// serveChild, then serves until its standard input closes.
func serveFloor() {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	g := grpc.NewServer()
	pb.RegisterGRPCInferenceServiceServer(g, &floorService{resp: &pb.ModelInferResponse{
		ModelName: "floor", ModelVersion: "1",
		Outputs:           []*pb.ModelInferResponse_InferOutputTensor{{Name: "y", Datatype: "FP32", Shape: []int64{1, 10}}},
		RawOutputContents: [][]byte{make([]byte, 40)},
	}})
	go g.Serve(lis)
	fmt.Printf("%s - 0 0\n", lis.Addr())
	io.Copy(io.Discard, os.Stdin)
	g.Stop()
}
