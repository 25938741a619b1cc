package flightserver_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/internal/testkit"
	kflight "github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/manager"
	"github.com/kilnml/kiln/serving/repository"
)

func TestMain(m *testing.M) { testkit.Main(m) }

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newManager loads every test model.
func newManager(t *testing.T) *manager.Manager {
	t.Helper()
	repo, err := repository.Open(testkit.Fixture(t, "flight-repo"))
	require.NoError(t, err)
	mgr := manager.New(repo, manager.Options{Logger: quietLogger()})
	require.NoError(t, mgr.LoadAll())
	t.Cleanup(mgr.Close)
	return mgr
}

// env is a started Flight service and a client of it.
type env struct {
	srv    *kflight.Server
	client flight.Client
	data   string
}

// start starts a Flight service on a free loopback port with opts (DataDir
// defaults to a temp dir) and connects a client with dial options.
func start(t *testing.T, opts kflight.Options, dial ...grpc.DialOption) *env {
	t.Helper()
	if opts.DataDir == "" {
		opts.DataDir = t.TempDir()
	}
	opts.Addr = "127.0.0.1:0"
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	srv, err := kflight.New(opts)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		require.NoError(t, srv.Shutdown(ctx))
	})
	if len(dial) == 0 {
		dial = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	dial = append(dial, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30)))
	c, err := flight.NewClientWithMiddleware(srv.Addr().String(), nil, nil, dial...)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return &env{srv: srv, client: c, data: opts.DataDir}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func datasetDesc(name string) *flight.FlightDescriptor {
	return &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", name}}
}

func modelDesc(path ...string) *flight.FlightDescriptor {
	return &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: append([]string{"models"}, path...)}
}

// put uploads recs as dataset name and returns the PutProgress
// acknowledgements the server sent.
func (e *env) put(ctx context.Context, name string, recs ...arrow.RecordBatch) ([]kflight.PutProgress, error) {
	stream, err := e.client.DoPut(ctx)
	if err != nil {
		return nil, err
	}
	w := flight.NewRecordWriter(stream, ipc.WithSchema(recs[0].Schema()))
	w.SetFlightDescriptor(datasetDesc(name))
	var werr error
	for _, r := range recs {
		if werr = w.Write(r); werr != nil {
			break // the server ended the call: Recv returns its status
		}
	}
	w.Close()
	stream.CloseSend()
	acks, err := readAcks(stream)
	if err == nil && werr != nil {
		err = fmt.Errorf("writing: %w", werr)
	}
	return acks, err
}

func readAcks(stream flight.FlightService_DoPutClient) ([]kflight.PutProgress, error) {
	var acks []kflight.PutProgress
	for {
		res, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return acks, nil
		}
		if err != nil {
			return acks, err
		}
		var p kflight.PutProgress
		if err := json.Unmarshal(res.GetAppMetadata(), &p); err != nil {
			return acks, fmt.Errorf("ack %q: %w", res.GetAppMetadata(), err)
		}
		acks = append(acks, p)
	}
}

// get reads a dataset back with DoGet.
func (e *env) get(t *testing.T, ctx context.Context, name string) []arrow.RecordBatch {
	t.Helper()
	info, err := e.client.GetFlightInfo(ctx, datasetDesc(name))
	require.NoError(t, err)
	require.Len(t, info.Endpoint, 1)
	stream, err := e.client.DoGet(ctx, info.Endpoint[0].Ticket)
	require.NoError(t, err)
	rdr, err := flight.NewRecordReader(stream)
	require.NoError(t, err)
	defer rdr.Release()
	var out []arrow.RecordBatch
	for rdr.Next() {
		r := rdr.RecordBatch()
		r.Retain()
		out = append(out, r)
	}
	require.NoError(t, rdr.Err())
	return out
}

// requireCode checks that err is a gRPC status with code c whose message
// contains every one of parts.
func requireCode(t *testing.T, err error, c codes.Code, parts ...string) {
	t.Helper()
	require.Error(t, err)
	st, ok := status.FromError(err)
	require.True(t, ok, "not a status: %v", err)
	require.Equal(t, c, st.Code(), "status: %v", err)
	for _, p := range parts {
		require.Contains(t, st.Message(), p)
	}
}

// visibleFiles lists the data directory's files.
func visibleFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}
