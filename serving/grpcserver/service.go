// Package grpcserver implements the KServe v2 / Triton gRPC inference
// service (inference.GRPCInferenceService) over a model manager.
package grpcserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnml/kiln/serving/batcher"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/limits"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
	kstatus "github.com/kilnml/kiln/serving/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Extensions are the protocol extensions the service supports.
var Extensions = []string{"classification", "model_repository", "model_configuration", "statistics", "binary_tensor_data"}

// Options configure a Service.
type Options struct {
	// Name and Version are reported by ServerMetadata.
	Name, Version string
	// Ready reports server readiness; nil means the manager's readiness.
	Ready func() bool
	// Logger receives the service's logs; nil means slog.Default().
	Logger *slog.Logger
	// MaxStreamInFlight bounds the requests of one ModelStreamInfer stream
	// that run at once (0: 64).
	MaxStreamInFlight int
	// Stopping, when closed, ends every ModelStreamInfer stream once its
	// requests in flight are answered, so that a graceful stop does not
	// wait for clients to close their streams. Nil never closes.
	Stopping <-chan struct{}
	// MaxInputs bounds the inputs of one request and MaxTensorElements the
	// elements of one input (0: limits.DefaultMaxInputs,
	// limits.DefaultMaxTensorElements); beyond them a request is
	// INVALID_ARGUMENT before its data is decoded.
	MaxInputs         int
	MaxTensorElements int64
	// Gate admits each ModelStreamInfer message by its size before its
	// tensors are decoded, against the bytes in flight that unary
	// requests share (the unary ones pass limits.Gate's interceptor); a
	// message it refuses is answered with a RESOURCE_EXHAUSTED
	// error_message and the stream goes on. Nil admits every message.
	Gate *limits.Gate
}

// Service is the GRPCInferenceService over a model manager.
type Service struct {
	pb.UnimplementedGRPCInferenceServiceServer
	mgr  *manager.Manager
	opts Options
	log  *slog.Logger
}

// New returns the service for mgr.
func New(mgr *manager.Manager, opts Options) *Service {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Ready == nil {
		opts.Ready = mgr.Ready
	}
	if opts.MaxStreamInFlight <= 0 {
		opts.MaxStreamInFlight = 64
	}
	return &Service{mgr: mgr, opts: opts, log: opts.Logger}
}

// Register adds the service to g.
func (s *Service) Register(g *grpc.Server) { pb.RegisterGRPCInferenceServiceServer(g, s) }

// toStatus maps an error to a gRPC status by its code (serving/status).
func toStatus(err error) error { return kstatus.GRPC(err) }

// ServerLive reports that the server is live.
func (s *Service) ServerLive(context.Context, *pb.ServerLiveRequest) (*pb.ServerLiveResponse, error) {
	return &pb.ServerLiveResponse{Live: true}, nil
}

// ServerReady reports whether every model is loaded.
func (s *Service) ServerReady(context.Context, *pb.ServerReadyRequest) (*pb.ServerReadyResponse, error) {
	return &pb.ServerReadyResponse{Ready: s.opts.Ready()}, nil
}

// ModelReady reports whether a model version serves.
func (s *Service) ModelReady(_ context.Context, req *pb.ModelReadyRequest) (*pb.ModelReadyResponse, error) {
	v, err := s.mgr.Acquire(req.GetName(), req.GetVersion())
	if err != nil {
		if errors.Is(err, manager.ErrNotFound) || errors.Is(err, manager.ErrUnavailable) {
			return &pb.ModelReadyResponse{Ready: false}, nil
		}
		return nil, toStatus(err)
	}
	v.Release()
	return &pb.ModelReadyResponse{Ready: true}, nil
}

// ServerMetadata describes the server.
func (s *Service) ServerMetadata(context.Context, *pb.ServerMetadataRequest) (*pb.ServerMetadataResponse, error) {
	return &pb.ServerMetadataResponse{Name: s.opts.Name, Version: s.opts.Version, Extensions: Extensions}, nil
}

// ModelMetadata describes a model's inputs and outputs.
func (s *Service) ModelMetadata(_ context.Context, req *pb.ModelMetadataRequest) (*pb.ModelMetadataResponse, error) {
	v, err := s.mgr.Acquire(req.GetName(), req.GetVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	defer v.Release()
	cfg := v.Config()
	resp := &pb.ModelMetadataResponse{Name: v.Name(), Platform: cfg.Platform}
	for _, n := range s.mgr.Versions(v.Name()) {
		resp.Versions = append(resp.Versions, strconv.FormatInt(n, 10))
	}
	for _, t := range cfg.Inputs {
		resp.Inputs = append(resp.Inputs, &pb.ModelMetadataResponse_TensorMetadata{Name: t.Name, Datatype: string(t.DataType), Shape: expectedShape(cfg, t)})
	}
	for _, t := range cfg.Outputs {
		resp.Outputs = append(resp.Outputs, &pb.ModelMetadataResponse_TensorMetadata{Name: t.Name, Datatype: string(t.DataType), Shape: expectedShape(cfg, t)})
	}
	return resp, nil
}

// ModelConfig returns a model's configuration in the protocol's form.
func (s *Service) ModelConfig(_ context.Context, req *pb.ModelConfigRequest) (*pb.ModelConfigResponse, error) {
	v, err := s.mgr.Acquire(req.GetName(), req.GetVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	defer v.Release()
	return &pb.ModelConfigResponse{Config: ConfigProto(v.Config())}, nil
}

var protoTypes = map[repository.DataType]pb.DataType{
	repository.Bool: pb.DataType_TYPE_BOOL, repository.Uint8: pb.DataType_TYPE_UINT8,
	repository.Uint16: pb.DataType_TYPE_UINT16, repository.Uint32: pb.DataType_TYPE_UINT32,
	repository.Uint64: pb.DataType_TYPE_UINT64, repository.Int8: pb.DataType_TYPE_INT8,
	repository.Int16: pb.DataType_TYPE_INT16, repository.Int32: pb.DataType_TYPE_INT32,
	repository.Int64: pb.DataType_TYPE_INT64, repository.FP16: pb.DataType_TYPE_FP16,
	repository.FP32: pb.DataType_TYPE_FP32, repository.FP64: pb.DataType_TYPE_FP64,
	repository.BF16: pb.DataType_TYPE_BF16, repository.Bytes: pb.DataType_TYPE_STRING,
}

// ConfigProto converts a repository configuration to the protocol's
// ModelConfig.
func ConfigProto(c *repository.Config) *pb.ModelConfig {
	mc := &pb.ModelConfig{
		Name: c.Name, Platform: "pytorch_libtorch", Backend: "kiln",
		MaxBatchSize:         int32(c.MaxBatchSize),
		DefaultModelFilename: c.ModelFile,
		InstanceGroup:        []*pb.ModelInstanceGroup{instanceGroup(c)},
		Parameters:           map[string]*pb.ModelParameter{"kiln_platform": {StringValue: c.Platform}},
	}
	if mc.DefaultModelFilename == "" {
		mc.DefaultModelFilename = repository.DefaultModelFile
	}
	for _, t := range c.Inputs {
		mc.Input = append(mc.Input, &pb.ModelInput{Name: t.Name, DataType: protoTypes[t.DataType], Dims: t.Dims})
	}
	for _, t := range c.Outputs {
		mc.Output = append(mc.Output, &pb.ModelOutput{Name: t.Name, DataType: protoTypes[t.DataType], Dims: t.Dims, LabelFilename: t.Labels})
	}
	p := c.VersionPolicy
	switch {
	case p.All:
		mc.VersionPolicy = &pb.ModelVersionPolicy{PolicyChoice: &pb.ModelVersionPolicy_All_{All: &pb.ModelVersionPolicy_All{}}}
	case len(p.Specific) > 0:
		mc.VersionPolicy = &pb.ModelVersionPolicy{PolicyChoice: &pb.ModelVersionPolicy_Specific_{Specific: &pb.ModelVersionPolicy_Specific{Versions: p.Specific}}}
	default:
		mc.VersionPolicy = &pb.ModelVersionPolicy{PolicyChoice: &pb.ModelVersionPolicy_Latest_{Latest: &pb.ModelVersionPolicy_Latest{NumVersions: uint32(max(p.Latest, 1))}}}
	}
	if d := c.DynamicBatching; d != nil {
		db := &pb.ModelDynamicBatching{MaxQueueDelayMicroseconds: uint64(d.MaxQueueDelayUS)}
		for _, s := range d.PreferredBatchSizes {
			db.PreferredBatchSize = append(db.PreferredBatchSize, int32(s))
		}
		if d.MaxQueueSize > 0 {
			db.DefaultQueuePolicy = &pb.ModelQueuePolicy{MaxQueueSize: uint32(d.MaxQueueSize)}
		}
		mc.SchedulingChoice = &pb.ModelConfig_DynamicBatching{DynamicBatching: db}
	}
	return mc
}

// ModelInfer runs one inference.
func (s *Service) ModelInfer(ctx context.Context, req *pb.ModelInferRequest) (*pb.ModelInferResponse, error) {
	resp, err := s.infer(ctx, req)
	return resp, toStatus(err)
}

func (s *Service) infer(ctx context.Context, req *pb.ModelInferRequest) (*pb.ModelInferResponse, error) {
	start := time.Now()
	v, err := s.mgr.AcquireFor(req.GetModelName(), req.GetModelVersion(), routingKey(ctx, req))
	if err != nil {
		return nil, err
	}
	defer v.Release()
	resp, err := s.run(ctx, v, req)
	v.Stats().RecordRequest(err == nil, time.Since(start))
	if err != nil {
		s.log.Debug("inference failed", "model", v.Name(), "version", v.Number(), "id", req.GetId(), "err", err)
	}
	return resp, err
}

type wanted struct {
	index int // into the config's outputs
	top   int // classification: top k; 0 for the tensor itself
}

func (s *Service) run(ctx context.Context, v *manager.Version, req *pb.ModelInferRequest) (*pb.ModelInferResponse, error) {
	cfg := v.Config()
	ins, err := decodeInputs(v.Name(), cfg, req, decodeLimits{maxInputs: s.opts.MaxInputs, maxElements: s.opts.MaxTensorElements})
	if err != nil {
		return nil, err
	}
	var want []wanted
	if len(req.GetOutputs()) == 0 {
		for i := range cfg.Outputs {
			want = append(want, wanted{index: i})
		}
	}
	for _, o := range req.GetOutputs() {
		idx := -1
		for i, c := range cfg.Outputs {
			if c.Name == o.GetName() {
				idx = i
			}
		}
		if idx < 0 {
			names := make([]string, len(cfg.Outputs))
			for i, c := range cfg.Outputs {
				names[i] = c.Name
			}
			return nil, invalid("model %q: unknown output %q (the model has %s)", v.Name(), o.GetName(), strings.Join(names, ", "))
		}
		w := wanted{index: idx}
		if p, ok := o.GetParameters()["classification"]; ok {
			var k int64
			switch x := p.GetParameterChoice().(type) {
			case *pb.InferParameter_Int64Param:
				k = x.Int64Param
			case *pb.InferParameter_Uint64Param:
				k = int64(min(x.Uint64Param, 1<<31))
			case *pb.InferParameter_StringParam:
				k, _ = strconv.ParseInt(x.StringParam, 10, 64)
			}
			if k < 1 {
				return nil, invalid("output %q: classification needs a positive class count", o.GetName())
			}
			w.top = int(min(k, 1<<20))
		}
		want = append(want, w)
	}
	outs, err := v.Infer(ctx, ins)
	if err != nil {
		return nil, err
	}
	if err := manager.CheckOutputs(cfg, outs); err != nil {
		return nil, &batcher.ExecError{Err: err}
	}
	resp := &pb.ModelInferResponse{ModelName: v.Name(), ModelVersion: strconv.FormatInt(v.Number(), 10), Id: req.GetId()}
	for _, w := range want {
		c := cfg.Outputs[w.index]
		t := outs[w.index]
		if w.top > 0 {
			shape, data, err := classify(t, w.top, v.Labels(c.Name), cfg.MaxBatchSize > 0, c.Binary)
			if err != nil {
				return nil, invalid("output %q: classification: %v", c.Name, err)
			}
			resp.Outputs = append(resp.Outputs, &pb.ModelInferResponse_InferOutputTensor{Name: c.Name, Datatype: string(repository.Bytes), Shape: shape})
			resp.RawOutputContents = append(resp.RawOutputContents, data)
			continue
		}
		resp.Outputs = append(resp.Outputs, &pb.ModelInferResponse_InferOutputTensor{Name: c.Name, Datatype: string(c.DataType), Shape: t.Shape})
		resp.RawOutputContents = append(resp.RawOutputContents, t.Data)
	}
	return resp, nil
}

// ModelStreamInfer runs the inferences of a stream, several at once;
// responses carry their request's id and may come out of order. A failed
// request answers with error_message and the stream goes on. Each request
// is admitted by its size through Options.Gate as soon as it is received
// and holds its bytes until it is answered; one the gate refuses is
// answered at once with error_message "server busy: ..." (RESOURCE_EXHAUSTED
// in Triton's words: the client may send it again). When the service is
// stopping (Options.Stopping), the stream takes no more requests, answers
// those in flight, and ends with OK.
func (s *Service) ModelStreamInfer(stream pb.GRPCInferenceService_ModelStreamInferServer) error {
	ctx := stream.Context()
	var sendMu sync.Mutex
	var sendErr error
	send := func(msg *pb.ModelStreamInferResponse) {
		sendMu.Lock()
		defer sendMu.Unlock()
		if sendErr == nil {
			sendErr = stream.Send(msg)
		}
	}
	fail := func(req *pb.ModelInferRequest, err error) {
		send(&pb.ModelStreamInferResponse{
			ErrorMessage:  status.Convert(toStatus(err)).Message(),
			InferResponse: &pb.ModelInferResponse{ModelName: req.GetModelName(), ModelVersion: req.GetModelVersion(), Id: req.GetId()},
		})
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, s.opts.MaxStreamInFlight)
	defer wg.Wait()
	// A received request, admitted (n bytes held in the gate) or refused
	// (busy); n is released once it is answered or dropped.
	type received struct {
		req  *pb.ModelInferRequest
		err  error
		n    int64
		busy error
	}
	// Recv blocks; it runs apart so that a stop can end the stream. After
	// the handler returns, gRPC fails the pending Recv and the goroutine
	// ends.
	recv := make(chan received)
	go func() {
		for {
			req, err := stream.Recv()
			r := received{req: req, err: err}
			if err == nil {
				r.n = int64(proto.Size(req))
				if !s.opts.Gate.Acquire(r.n) {
					r.busy, r.n = s.opts.Gate.Busy(r.n), 0
				}
			}
			select {
			case recv <- r:
			case <-ctx.Done():
				s.opts.Gate.Release(r.n)
				return
			}
			if err != nil {
				return
			}
		}
	}()
	for {
		var r received
		select {
		case r = <-recv:
		case <-s.opts.Stopping:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
		if errors.Is(r.err, io.EOF) {
			return nil
		}
		if r.err != nil {
			return r.err
		}
		req := r.req
		if r.busy != nil {
			// Keep what the answer names, not the refused data.
			req = &pb.ModelInferRequest{ModelName: req.GetModelName(), ModelVersion: req.GetModelVersion(), Id: req.GetId()}
		}
		// The answer, refused or not, is sent apart: a client that reads
		// answers only after sending must not stall the receiving loop.
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			s.opts.Gate.Release(r.n)
			return ctx.Err()
		}
		wg.Go(func() {
			defer func() { <-sem }()
			defer s.opts.Gate.Release(r.n)
			if r.busy != nil {
				fail(req, r.busy)
				return
			}
			resp, err := s.infer(ctx, req)
			if err != nil {
				fail(req, err)
				return
			}
			send(&pb.ModelStreamInferResponse{InferResponse: resp})
		})
	}
}

func duration(d batcher.Duration) *pb.StatisticDuration {
	return &pb.StatisticDuration{Count: d.Count, Ns: d.NS}
}

// ModelStatistics returns the statistics of the loaded versions of one
// model, or of every model when no name is given.
func (s *Service) ModelStatistics(_ context.Context, req *pb.ModelStatisticsRequest) (*pb.ModelStatisticsResponse, error) {
	var versions []*manager.Version
	if req.GetName() == "" {
		versions = s.mgr.Loaded()
	} else {
		v, err := s.mgr.Acquire(req.GetName(), req.GetVersion())
		if err != nil {
			return nil, toStatus(err)
		}
		v.Release()
		for _, v := range s.mgr.Loaded() {
			if v.Name() == req.GetName() && (req.GetVersion() == "" || strconv.FormatInt(v.Number(), 10) == req.GetVersion()) {
				versions = append(versions, v)
			}
		}
	}
	resp := &pb.ModelStatisticsResponse{}
	for _, v := range versions {
		st := v.Stats().Snapshot()
		ms := &pb.ModelStatistics{
			Name: v.Name(), Version: strconv.FormatInt(v.Number(), 10),
			InferenceCount: st.InferenceCount, ExecutionCount: st.ExecutionCount,
			InferenceStats: &pb.InferStatistics{
				Success: duration(st.Success), Fail: duration(st.Fail), Queue: duration(st.Queue),
				ComputeInput: duration(st.ComputeInput), ComputeInfer: duration(st.ComputeInfer),
				ComputeOutput: duration(st.ComputeOutput), CacheHit: &pb.StatisticDuration{}, CacheMiss: &pb.StatisticDuration{},
			},
		}
		if !st.LastInference.IsZero() {
			ms.LastInference = uint64(st.LastInference.UnixMilli())
		}
		for _, b := range st.Batches {
			ms.BatchStats = append(ms.BatchStats, &pb.InferBatchStatistics{
				BatchSize: uint64(b.Size), ComputeInput: duration(b.ComputeInput),
				ComputeInfer: duration(b.ComputeInfer), ComputeOutput: duration(b.ComputeOutput),
			})
		}
		resp.ModelStats = append(resp.ModelStats, ms)
	}
	return resp, nil
}

// RepositoryIndex lists the repository's models and their state.
func (s *Service) RepositoryIndex(_ context.Context, req *pb.RepositoryIndexRequest) (*pb.RepositoryIndexResponse, error) {
	idx, err := s.mgr.Index(req.GetReady())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	resp := &pb.RepositoryIndexResponse{}
	for _, e := range idx {
		resp.Models = append(resp.Models, &pb.RepositoryIndexResponse_ModelIndex{Name: e.Name, Version: e.Version, State: e.State, Reason: e.Reason})
	}
	return resp, nil
}

// RepositoryModelLoad loads or reloads a model from the repository.
func (s *Service) RepositoryModelLoad(_ context.Context, req *pb.RepositoryModelLoadRequest) (*pb.RepositoryModelLoadResponse, error) {
	if len(req.GetParameters()) > 0 {
		return nil, invalid("model %q: load parameters (config or file overrides) are not supported", req.GetModelName())
	}
	if err := s.mgr.Load(req.GetModelName()); err != nil {
		if errors.Is(err, manager.ErrNotFound) {
			return nil, status.Error(codes.NotFound, err.Error())
		}
		return nil, status.Error(codes.Internal, fmt.Sprintf("failed to load %q: %v", req.GetModelName(), err))
	}
	return &pb.RepositoryModelLoadResponse{}, nil
}

// RepositoryModelUnload unloads a model, waiting for its requests in flight.
func (s *Service) RepositoryModelUnload(_ context.Context, req *pb.RepositoryModelUnloadRequest) (*pb.RepositoryModelUnloadResponse, error) {
	if err := s.mgr.Unload(req.GetModelName()); err != nil {
		return nil, toStatus(err)
	}
	return &pb.RepositoryModelUnloadResponse{}, nil
}

// instanceGroup is the model's placement in Triton's terms: KIND_CPU, or
// KIND_GPU with the one GPU the model version runs on.
func instanceGroup(c *repository.Config) *pb.ModelInstanceGroup {
	g := &pb.ModelInstanceGroup{Name: c.Name, Count: int32(c.Instances()), Kind: pb.ModelInstanceGroup_KIND_CPU}
	if d := c.DeviceName(); d != "cpu" {
		g.Kind = pb.ModelInstanceGroup_KIND_GPU
		idx := 0
		if rest, ok := strings.CutPrefix(d, "cuda:"); ok {
			idx, _ = strconv.Atoi(rest)
		}
		g.Gpus = []int32{int32(idx)}
	}
	return g
}
