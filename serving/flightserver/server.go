package flightserver

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/serving/auth"
	"github.com/kilnml/kiln/serving/limits"
	kstatus "github.com/kilnml/kiln/serving/status"
)

// streamBufferBytes and streamWindowBytes size the gRPC transport's socket
// buffers and HTTP/2 flow control windows for bulk Arrow data.
const (
	streamBufferBytes = 1 << 20
	streamWindowBytes = 32 << 20
)

// DefaultAddr is the default listen address of the Flight service.
const DefaultAddr = ":8815"

// Descriptor path heads.
const (
	// DatasetsPath heads the descriptor path ["datasets", NAME].
	DatasetsPath = "datasets"
	// ModelsPath heads the descriptor path ["models", NAME(, VERSION)].
	ModelsPath = "models"
)

// Action types of DoAction.
const (
	ActionTrain     = "train"
	ActionJobStatus = "job-status"
	ActionCancel    = "cancel"
	ActionListJobs  = "list-jobs"
	// ActionPipelineRun starts a pipeline run (package pipeline) from the
	// YAML body; see Options.Pipelines.
	ActionPipelineRun = "pipeline_run"
)

// Options configure a Server.
type Options struct {
	// DataDir is the directory of the stored datasets (required; created
	// if missing).
	DataDir string
	// Addr is the listen address (default DefaultAddr); port 0 picks a free
	// port (see Server.Addr).
	Addr string
	// Models serves DoExchange inference; nil makes DoExchange fail with
	// UNAVAILABLE. Use ManagerModels(serving.Server.Manager()) to share the
	// gRPC service's models, batchers and statistics.
	Models Models
	// Trainer runs the `train` action's jobs; nil makes `train` fail with
	// UNIMPLEMENTED.
	Trainer Trainer
	// Pipelines runs the `pipeline_run` action's jobs; nil makes it fail
	// with UNIMPLEMENTED.
	Pipelines PipelineRunner
	// OnDatasetCommitted, when set, is called after DoPut commits a
	// dataset (continuous training watches a dataset with it); it must
	// return quickly.
	OnDatasetCommitted func(DatasetInfo)
	// Auth is the authentication policy (serving/auth): with a token or
	// users, datasets and actions need a bearer token, DoExchange too
	// when the policy protects inference; Handshake runs Flight's
	// basic-auth exchange. nil lets every call through.
	Auth *auth.Policy
	// TLSConfig, when set, serves TLS with it.
	TLSConfig *tls.Config
	// CertFile and KeyFile, when TLSConfig is nil and both are set, serve
	// TLS with that PEM certificate chain and key.
	CertFile, KeyFile string
	// MaxMessageBytes limits received and sent gRPC messages (default
	// math.MaxInt32), so record batches up to 2 GiB fit.
	MaxMessageBytes int
	// MaxTensorElements bounds the length of a received record batch and
	// of each of its columns (0: limits.DefaultMaxTensorElements);
	// MaxConcurrentStreams the concurrent streams of one connection (0:
	// limits.DefaultMaxConcurrentStreams). Every FlightData header is
	// checked against its body before decoding (see checkIPCHeader).
	MaxTensorElements    int64
	MaxConcurrentStreams uint32
	// Gate admits every FlightData message that DoPut and DoExchange
	// receive, by its size, before Arrow decodes it, against the bytes in
	// flight the server's other listeners share; the bytes are held until
	// the batch is written (DoPut) or its predictions are made
	// (DoExchange). A message it refuses ends the stream with
	// RESOURCE_EXHAUSTED (DoPut stores nothing). Nil admits everything.
	Gate *limits.Gate
	// Streams bounds the client-streaming calls (DoPut, DoExchange,
	// Handshake) open at once, shared with the server's other listeners;
	// a stream beyond it is answered RESOURCE_EXHAUSTED. Nil: no limit.
	Streams *limits.Streams
	// Allocator allocates the memory of decoded batches (default
	// memory.DefaultAllocator).
	Allocator memory.Allocator
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
}

// Server is Kiln's Arrow Flight service. Its methods other than New, Start,
// Addr, Shutdown, Jobs and Datasets implement flight.FlightServer, so it may
// also be registered on another gRPC server with
// flight.RegisterFlightServiceServer (without Options.Auth, which only the
// server's own interceptors enforce).
type Server struct {
	flight.BaseFlightServer

	opts  Options
	log   *slog.Logger
	mem   memory.Allocator
	store *store
	jobs  *Jobs
	grpc  *grpc.Server
	// hdrLim bounds the IPC headers of received FlightData.
	hdrLim headerLimits

	mu       sync.Mutex
	lis      net.Listener
	started  bool
	serveErr chan error

	stopping    chan struct{} // closed when Shutdown begins
	stopOnce    sync.Once
	shutdownErr error
}

// New validates opts and opens the data directory; nothing listens yet.
func New(opts Options) (*Server, error) {
	if opts.DataDir == "" {
		return nil, errors.New("flight: no data directory")
	}
	if opts.Addr == "" {
		opts.Addr = DefaultAddr
	}
	if opts.MaxMessageBytes <= 0 {
		opts.MaxMessageBytes = math.MaxInt32
	}
	if opts.MaxTensorElements <= 0 {
		opts.MaxTensorElements = limits.DefaultMaxTensorElements
	}
	if opts.MaxConcurrentStreams == 0 {
		opts.MaxConcurrentStreams = limits.DefaultMaxConcurrentStreams
	}
	if opts.Allocator == nil {
		opts.Allocator = memory.DefaultAllocator
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	st, err := newStore(opts.DataDir, opts.Allocator)
	if err != nil {
		return nil, fmt.Errorf("flight: %w", err)
	}
	s := &Server{opts: opts, log: opts.Logger, mem: opts.Allocator, store: st, stopping: make(chan struct{}),
		hdrLim: headerLimits{maxLength: opts.MaxTensorElements, maxUncompressed: int64(opts.MaxMessageBytes)}}
	if opts.Trainer != nil || opts.Pipelines != nil {
		s.jobs = NewJobs(opts.Trainer)
	}
	gopts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(opts.MaxMessageBytes),
		grpc.MaxSendMsgSize(opts.MaxMessageBytes),
		// Record batches are megabytes: large socket buffers save
		// syscalls, and large flow control windows keep a client sending
		// while the previous batch is written and synced.
		grpc.ReadBufferSize(streamBufferBytes),
		grpc.WriteBufferSize(streamBufferBytes),
		grpc.InitialWindowSize(streamWindowBytes),
		grpc.InitialConnWindowSize(2 * streamWindowBytes),
		// FlightData bodies are copied once, into reused buffers.
		grpc.ForceServerCodecV2(newFlightCodec()),
		grpc.MaxConcurrentStreams(opts.MaxConcurrentStreams),
	}
	// Outermost: every error leaves with its code and a bounded message.
	gopts = append(gopts, kstatus.ServerOptions()...)
	tlsCfg := opts.TLSConfig
	if tlsCfg == nil && (opts.CertFile != "" || opts.KeyFile != "") {
		if opts.CertFile == "" || opts.KeyFile == "" {
			return nil, errors.New("flight: TLS needs both CertFile and KeyFile")
		}
		cert, err := tls.LoadX509KeyPair(opts.CertFile, opts.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("flight: loading TLS key pair: %w", err)
		}
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	if tlsCfg != nil {
		gopts = append(gopts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	}
	gopts = append(gopts, opts.Auth.FlightServerOptions()...)
	// After auth: an unauthenticated stream holds no admission.
	gopts = append(gopts, grpc.ChainStreamInterceptor(opts.Streams.StreamServerInterceptor()))
	s.grpc = grpc.NewServer(gopts...)
	flight.RegisterFlightServiceServer(s.grpc, s)
	return s, nil
}

// Start listens on Options.Addr and serves in the background until
// Shutdown.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return errors.New("flight: server already started")
	}
	var lc net.ListenConfig
	lis, err := lc.Listen(ctx, "tcp", s.opts.Addr)
	if err != nil {
		return fmt.Errorf("flight: listening on %s: %w", s.opts.Addr, err)
	}
	s.lis, s.started = lis, true
	s.serveErr = make(chan error, 1)
	go func() { s.serveErr <- s.grpc.Serve(lis) }()
	s.log.Info("flight service listening", "addr", lis.Addr().String(), "data_dir", s.store.dir)
	return nil
}

// Addr returns the address the service listens on, or nil before Start.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lis == nil {
		return nil
	}
	return s.lis.Addr()
}

// Shutdown stops accepting calls, lets calls in flight finish until ctx
// ends (then cancels them), and cancels running training jobs, waiting for
// them to return. An interrupted DoPut leaves no dataset behind.
//
// Shutdown first closes the streams that wait on their client: an open
// DoExchange answers the batches it has read and ends with UNAVAILABLE.
// A second Shutdown waits for the first and returns its error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopOnce.Do(func() {
		close(s.stopping)
		s.shutdownErr = s.shutdown(ctx)
	})
	return s.shutdownErr
}

// shutdown is Shutdown's one run.
func (s *Server) shutdown(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		s.grpc.Stop()
		<-done
		err = fmt.Errorf("flight: shutdown: %w", ctx.Err())
	}
	if s.jobs != nil {
		s.jobs.Close()
	}
	s.mu.Lock()
	started := s.started
	s.mu.Unlock()
	if started {
		if serr := <-s.serveErr; serr != nil && !errors.Is(serr, grpc.ErrServerStopped) && err == nil {
			err = fmt.Errorf("flight: serving: %w", serr)
		}
	}
	return err
}

// Jobs returns the training job registry, or nil without a Trainer.
func (s *Server) Jobs() *Jobs { return s.jobs }

// Datasets describes the stored datasets, by name.
func (s *Server) Datasets() ([]DatasetInfo, error) { return s.store.list() }

// Dataset describes the stored dataset name; the error wraps
// os.ErrNotExist when there is none.
func (s *Server) Dataset(name string) (DatasetInfo, error) { return s.store.info(name) }

// recoverStatus turns a panic of a handler into an INTERNAL status.
func recoverStatus(err *error, what string) {
	if p := recover(); p != nil {
		*err = status.Errorf(codes.Internal, "%s: internal error: %v", what, p)
		slog.Error("flight handler panicked", "call", what, "panic", p, "stack", string(debug.Stack()))
	}
}

// toStatus maps an error to a gRPC status by its code (serving/status):
// Flight is gRPC, so it answers as the KServe v2 gRPC service does.
func toStatus(err error) error { return kstatus.GRPC(err) }

// statusFromReadErr maps an error reading a client's stream: the client
// going away, or malformed data.
func statusFromReadErr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return status.Errorf(codes.Canceled, "%s: %v", what, ctx.Err())
	}
	if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
		return status.Errorf(st.Code(), "%s: %s", what, st.Message())
	}
	return status.Errorf(codes.InvalidArgument, "%s: %v", what, err)
}

// datasetDescriptor returns the dataset a ["datasets", NAME] descriptor
// names.
func datasetDescriptor(d *flight.FlightDescriptor) (string, error) {
	if d == nil || d.Type != flight.DescriptorPATH {
		return "", status.Error(codes.InvalidArgument, `expected a path descriptor ["datasets", NAME]`)
	}
	if len(d.Path) != 2 || d.Path[0] != DatasetsPath {
		return "", status.Errorf(codes.InvalidArgument, `expected a path descriptor ["datasets", NAME], got %q`, d.Path)
	}
	if err := ValidDatasetName(d.Path[1]); err != nil {
		return "", status.Error(codes.InvalidArgument, err.Error())
	}
	return d.Path[1], nil
}

// modelDescriptor returns the model and version a ["models", NAME(,
// VERSION)] descriptor names.
func modelDescriptor(d *flight.FlightDescriptor) (string, string, error) {
	if d == nil || d.Type != flight.DescriptorPATH || len(d.Path) < 2 || len(d.Path) > 3 || d.Path[0] != ModelsPath || d.Path[1] == "" {
		var p []string
		if d != nil {
			p = d.Path
		}
		return "", "", status.Errorf(codes.InvalidArgument, `DoExchange expects a path descriptor ["models", NAME] or ["models", NAME, VERSION], got %q`, p)
	}
	if len(d.Path) == 3 {
		return d.Path[1], d.Path[2], nil
	}
	return d.Path[1], "", nil
}

// acquire finds a serving model version, as a status error when it cannot.
func (s *Server) acquire(name, version string) (Model, error) {
	if s.opts.Models == nil {
		return nil, status.Error(codes.Unavailable, "this Flight service has no model manager: it stores datasets only")
	}
	m, err := s.opts.Models.Acquire(name, version)
	if err != nil {
		return nil, toStatus(err)
	}
	return m, nil
}

func ticketFor(name string) []byte { return []byte(DatasetsPath + "/" + name) }

func (s *Server) flightInfo(info DatasetInfo) *flight.FlightInfo {
	return &flight.FlightInfo{
		Schema:           flight.SerializeSchema(info.Schema, s.mem),
		FlightDescriptor: &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{DatasetsPath, info.Name}},
		Endpoint:         []*flight.FlightEndpoint{{Ticket: &flight.Ticket{Ticket: ticketFor(info.Name)}}},
		TotalRecords:     info.Rows,
		TotalBytes:       info.Bytes,
	}
}

// ListFlights lists the stored datasets; a non-empty criteria expression
// keeps those whose name starts with it.
func (s *Server) ListFlights(c *flight.Criteria, stream flight.FlightService_ListFlightsServer) (err error) {
	defer recoverStatus(&err, "ListFlights")
	infos, err := s.store.list()
	if err != nil {
		return toStatus(err)
	}
	prefix := string(c.GetExpression())
	for _, info := range infos {
		if !strings.HasPrefix(info.Name, prefix) {
			continue
		}
		if err := stream.Send(s.flightInfo(info)); err != nil {
			return err
		}
	}
	return nil
}

// GetFlightInfo describes the dataset of a ["datasets", NAME] descriptor:
// its schema, row and byte counts, and the ticket DoGet reads it with.
func (s *Server) GetFlightInfo(_ context.Context, d *flight.FlightDescriptor) (_ *flight.FlightInfo, err error) {
	defer recoverStatus(&err, "GetFlightInfo")
	name, err := datasetDescriptor(d)
	if err != nil {
		return nil, err
	}
	info, err := s.store.info(name)
	if err != nil {
		return nil, toStatus(err)
	}
	return s.flightInfo(info), nil
}

// GetSchema returns the schema of the dataset of a ["datasets", NAME]
// descriptor.
func (s *Server) GetSchema(_ context.Context, d *flight.FlightDescriptor) (_ *flight.SchemaResult, err error) {
	defer recoverStatus(&err, "GetSchema")
	name, err := datasetDescriptor(d)
	if err != nil {
		return nil, err
	}
	info, err := s.store.info(name)
	if err != nil {
		return nil, toStatus(err)
	}
	return &flight.SchemaResult{Schema: flight.SerializeSchema(info.Schema, s.mem)}, nil
}

// DoGet streams a stored dataset, batch by batch as it was put.
func (s *Server) DoGet(t *flight.Ticket, stream flight.FlightService_DoGetServer) (err error) {
	defer recoverStatus(&err, "DoGet")
	name, ok := strings.CutPrefix(string(t.GetTicket()), DatasetsPath+"/")
	if !ok {
		return status.Errorf(codes.InvalidArgument, "DoGet: ticket %q is not a dataset ticket (datasets/NAME)", t.GetTicket())
	}
	if err := ValidDatasetName(name); err != nil {
		return status.Errorf(codes.InvalidArgument, "DoGet: %v", err)
	}
	f, err := os.Open(s.store.path(name))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return status.Errorf(codes.NotFound, "DoGet: dataset %q does not exist", name)
		}
		return status.Errorf(codes.Internal, "DoGet: dataset %q: %v", name, err)
	}
	defer f.Close()
	rdr, err := ipc.NewFileReader(f, ipc.WithAllocator(s.mem))
	if err != nil {
		return status.Errorf(codes.Internal, "DoGet: dataset %q: %v", name, err)
	}
	defer rdr.Close()
	w := flight.NewRecordWriter(stream, ipc.WithSchema(rdr.Schema()), ipc.WithAllocator(s.mem))
	defer w.Close()
	for i := 0; i < rdr.NumRecords(); i++ {
		if err := stream.Context().Err(); err != nil {
			return status.FromContextError(err).Err()
		}
		rec, err := rdr.RecordBatch(i)
		if err != nil {
			return status.Errorf(codes.Internal, "DoGet: dataset %q: batch %d: %v", name, i, err)
		}
		if err := w.Write(rec); err != nil {
			return err
		}
	}
	return nil
}

// putSource reads a DoPut stream, marking its errors as the client's.
type putSource struct {
	ctx context.Context
	rdr *putReader
}

func (p putSource) Schema() *arrow.Schema { return p.rdr.Schema() }

func (p putSource) Read() (arrow.RecordBatch, error) {
	rec, err := p.rdr.Read()
	if err == nil || err == io.EOF {
		return rec, err
	}
	if p.ctx.Err() != nil {
		return nil, fmt.Errorf("the client went away: %w", p.ctx.Err())
	}
	if st, ok := status.FromError(err); ok && st.Code() == codes.Canceled {
		return nil, fmt.Errorf("the client went away: %w", context.Canceled)
	}
	if st, ok := status.FromError(err); ok && st.Code() == codes.ResourceExhausted {
		return nil, err // the gate refused a message: not the client's data
	}
	return nil, fmt.Errorf("%w: %v", errInvalidStream, withColumn(p.rdr.Schema(), err))
}

// acker sends PutResults from its own goroutine, so that a client that
// reads them late never stalls the upload: each carries the cumulative
// PutProgress, and acknowledgements not yet sent when a newer one is ready
// are merged into it.
type acker struct {
	stream flight.FlightService_DoPutServer
	mu     sync.Mutex
	latest PutProgress
	sent   PutProgress
	wake   chan struct{}
	stop   chan struct{}
	done   chan struct{}
	err    error
}

func newAcker(stream flight.FlightService_DoPutServer) *acker {
	a := &acker{stream: stream, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go a.run()
	return a
}

func (a *acker) update(p PutProgress) {
	a.mu.Lock()
	a.latest = p
	a.mu.Unlock()
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

func (a *acker) flush() error {
	a.mu.Lock()
	p := a.latest
	a.mu.Unlock()
	if p == a.sent {
		return nil
	}
	raw, _ := json.Marshal(p)
	if err := a.stream.Send(&flight.PutResult{AppMetadata: raw}); err != nil {
		return err
	}
	a.sent = p
	return nil
}

func (a *acker) run() {
	defer close(a.done)
	for {
		select {
		case <-a.wake:
			if a.err = a.flush(); a.err != nil {
				return
			}
		case <-a.stop:
			a.err = a.flush()
			return
		}
	}
}

// finish sends what remains and returns the first send error.
func (a *acker) finish() error {
	close(a.stop)
	<-a.done
	return a.err
}

// DoPut stores a stream with descriptor ["datasets", NAME] as dataset NAME
// (replacing any dataset of that name once the stream has been stored
// whole). Each batch is written and fsync'd before it is acknowledged with
// a PutResult whose app_metadata is the JSON PutProgress of the batches
// durable so far; the last PutResult, sent once the dataset is visible,
// has "committed": true.
func (s *Server) DoPut(stream flight.FlightService_DoPutServer) (err error) {
	defer recoverStatus(&err, "DoPut")
	ctx := stream.Context()
	rdr, err := newPutReader(stream, s.mem, s.hdrLim, s.opts.Gate)
	if err != nil {
		return statusFromReadErr(ctx, "DoPut: reading the schema", err)
	}
	defer rdr.Release()
	name, err := datasetDescriptor(rdr.LatestFlightDescriptor())
	if err != nil {
		return err
	}
	start := time.Now()
	ack := newAcker(stream)
	info, err := s.store.put(ctx, name, putSource{ctx: ctx, rdr: rdr}, ack.update)
	if err != nil {
		ack.finish()
		s.log.Warn("flight DoPut failed; nothing stored", "dataset", name, "err", err)
		return toStatus(err)
	}
	ack.update(PutProgress{Batches: info.Batches, Rows: info.Rows, Bytes: info.Bytes, Committed: true})
	if err := ack.finish(); err != nil {
		// The dataset is stored; only the last acknowledgement was lost.
		s.log.Warn("flight DoPut: sending the final acknowledgement", "dataset", name, "err", err)
	}
	s.log.Info("flight DoPut stored a dataset", "dataset", name, "rows", info.Rows, "batches", info.Batches, "bytes", info.Bytes, "duration", time.Since(start))
	if f := s.opts.OnDatasetCommitted; f != nil {
		f(info)
	}
	return nil
}

// ListActions lists the DoAction types.
func (s *Server) ListActions(_ *flight.Empty, stream flight.FlightService_ListActionsServer) error {
	for _, a := range []*flight.ActionType{
		{Type: ActionTrain, Description: `start a training job: body {"dataset": NAME, ...trainer options}; result {"job_id": ID}`},
		{Type: ActionJobStatus, Description: `a job's status: body ID (or {"job_id": ID}); result JobStatus JSON`},
		{Type: ActionCancel, Description: `cancel a job: body ID (or {"job_id": ID}); result JobStatus JSON`},
		{Type: ActionListJobs, Description: `every job's status: result a JSON array of JobStatus`},
		{Type: ActionPipelineRun, Description: `start a pipeline run: body the pipeline file (YAML); result {"job_id": ID, "run_id": RUN}; job-status follows it`},
	} {
		if err := stream.Send(a); err != nil {
			return err
		}
	}
	return nil
}

// jobID reads an action body naming a job: the bare id, a JSON string, or
// {"job_id": ID}.
func jobID(body []byte) (string, error) {
	b := strings.TrimSpace(string(body))
	var id string
	switch {
	case strings.HasPrefix(b, "{"):
		var v struct {
			JobID string `json:"job_id"`
		}
		if err := json.Unmarshal([]byte(b), &v); err != nil {
			return "", status.Errorf(codes.InvalidArgument, "action body: %v", err)
		}
		id = v.JobID
	case strings.HasPrefix(b, `"`):
		if err := json.Unmarshal([]byte(b), &id); err != nil {
			return "", status.Errorf(codes.InvalidArgument, "action body: %v", err)
		}
	default:
		id = b
	}
	if id == "" {
		return "", status.Error(codes.InvalidArgument, `action body: no job id (send ID or {"job_id": ID})`)
	}
	return id, nil
}

func sendJSON(stream flight.FlightService_DoActionServer, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return status.Errorf(codes.Internal, "encoding the result: %v", err)
	}
	return stream.Send(&flight.Result{Body: raw})
}

// DoAction runs the `train`, `job-status`, `cancel` and `list-jobs`
// actions (see ListActions).
func (s *Server) DoAction(a *flight.Action, stream flight.FlightService_DoActionServer) (err error) {
	defer recoverStatus(&err, "DoAction")
	switch a.GetType() {
	case ActionTrain, ActionJobStatus, ActionCancel, ActionListJobs, ActionPipelineRun:
	default:
		return status.Errorf(codes.Unimplemented, "unknown action %q (the actions are %s, %s, %s, %s and %s)", a.GetType(), ActionTrain, ActionJobStatus, ActionCancel, ActionListJobs, ActionPipelineRun)
	}
	if s.jobs == nil {
		return status.Errorf(codes.Unimplemented, "action %q: this server has no trainer configured, so it runs no training jobs", a.GetType())
	}
	switch {
	case a.GetType() == ActionTrain && s.opts.Trainer == nil:
		return status.Errorf(codes.Unimplemented, "action %q: this server has no trainer configured, so it runs no training jobs", a.GetType())
	case a.GetType() == ActionPipelineRun && s.opts.Pipelines == nil:
		return status.Errorf(codes.Unimplemented, "action %q: this server runs no pipelines (kiln serve needs --registry)", a.GetType())
	case a.GetType() == ActionPipelineRun:
		runID, run, err := s.opts.Pipelines.StartPipeline(stream.Context(), a.GetBody())
		if err != nil {
			return toStatus(fmt.Errorf("pipeline_run: %w", err))
		}
		id, err := s.jobs.StartFunc(stream.Context(), "", runID, run)
		if err != nil {
			return status.Errorf(codes.Unavailable, "pipeline_run: %v", err)
		}
		s.log.Info("flight pipeline run started", "job", id, "run", runID)
		return sendJSON(stream, map[string]string{"job_id": id, "run_id": runID})
	}
	switch a.GetType() {
	case ActionTrain:
		var spec struct {
			Dataset string `json:"dataset"`
		}
		if err := json.Unmarshal(a.GetBody(), &spec); err != nil {
			return status.Errorf(codes.InvalidArgument, `train: the body must be a JSON object {"dataset": NAME, ...}: %v`, err)
		}
		if spec.Dataset == "" {
			return status.Error(codes.InvalidArgument, `train: the spec names no dataset ({"dataset": NAME, ...})`)
		}
		info, err := s.store.info(spec.Dataset)
		if errors.Is(err, os.ErrNotExist) {
			return status.Errorf(codes.NotFound, "train: dataset %q does not exist", spec.Dataset)
		}
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "train: %v", err)
		}
		if c, ok := s.opts.Trainer.(TrainChecker); ok {
			if err := c.CheckTrain(a.GetBody(), info); err != nil {
				return toStatus(fmt.Errorf("train: %w", err))
			}
		}
		id, err := s.jobs.Start(stream.Context(), a.GetBody(), info.Name, info.Path)
		if err != nil {
			return status.Errorf(codes.Unavailable, "train: %v", err)
		}
		s.log.Info("flight training job started", "job", id, "dataset", info.Name)
		return sendJSON(stream, map[string]string{"job_id": id})
	case ActionJobStatus, ActionCancel:
		id, err := jobID(a.GetBody())
		if err != nil {
			return err
		}
		var st JobStatus
		if a.GetType() == ActionCancel {
			st, err = s.jobs.Cancel(id)
		} else {
			st, err = s.jobs.Status(id)
		}
		if err != nil {
			return toStatus(err)
		}
		return sendJSON(stream, st)
	default: // ActionListJobs
		return sendJSON(stream, s.jobs.List())
	}
}
