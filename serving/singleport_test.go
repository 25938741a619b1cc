package serving

import (
	"context"
	"crypto/tls"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
)

// startSinglePort serves serving-repo with gRPC on the HTTP port only.
func startSinglePort(t *testing.T, opts Config) *Server {
	t.Helper()
	cfg := testConfig(testkit.CopyFixture(t, "serving-repo"), opts)
	cfg.HTTPPort, cfg.GRPCPort, cfg.SinglePort = 0, PortOff, true
	srv, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		assert.NoError(t, srv.Shutdown(ctx))
	})
	require.Nil(t, srv.GRPCAddr(), "gRPC's own port is off")
	return srv
}

const inferJSON = `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`

// checkGRPC runs unary, streaming and health calls over conn.
func checkGRPC(t *testing.T, conn *grpc.ClientConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := pb.NewGRPCInferenceServiceClient(conn)
	resp, err := c.ModelInfer(ctx, affineReq("1", 1, 1, 2, 3, 4))
	require.NoError(t, err)
	assert.Equal(t, []float32{3, 5, 7, 9}, f32s(resp.RawOutputContents[0]))
	// A bad request gets its gRPC status through this path too.
	_, err = c.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: "nope"})
	requireCode(t, err, codes.NotFound, "nope")
	st, err := c.ModelStreamInfer(ctx)
	require.NoError(t, err)
	for range 3 {
		require.NoError(t, st.Send(affineReq("2", 1, 1, 2, 3, 4)))
		r, err := st.Recv()
		require.NoError(t, err)
		require.Empty(t, r.ErrorMessage)
		assert.Equal(t, []float32{4, 7, 10, 13}, f32s(r.InferResponse.RawOutputContents[0]))
	}
	require.NoError(t, st.CloseSend())
	h, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	assert.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, h.Status, "model corrupt failed to load")
}

// TestSinglePort: gRPC (h2c), REST over HTTP/1.1 and REST over h2c on one
// cleartext port.
func TestSinglePort(t *testing.T) {
	srv := startSinglePort(t, Config{})
	addr := srv.HTTPAddr().String()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	checkGRPC(t, conn)

	r := do(t, nil, "POST", "http://"+addr+"/v2/models/affine/infer", []byte(inferJSON), nil)
	require.Equal(t, 200, r.code, string(r.body))
	var h2c http.Protocols
	h2c.SetUnencryptedHTTP2(true)
	hc := &http.Client{Transport: &http.Transport{Protocols: &h2c}}
	resp, err := hc.Get("http://" + addr + "/v2/health/live")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, 2, resp.ProtoMajor, "REST over h2c")
	r = do(t, hc, "POST", "http://"+addr+"/v2/models/affine/infer", []byte(inferJSON), nil)
	require.Equal(t, 200, r.code, string(r.body))
}

// TestSinglePortTLS: gRPC (ALPN h2) and HTTPS REST (HTTP/1.1 and h2) on
// one TLS port.
func TestSinglePortTLS(t *testing.T) {
	certFile, keyFile, pool := testkit.SelfSigned(t, t.TempDir())
	srv := startSinglePort(t, Config{TLSCertFile: certFile, TLSKeyFile: keyFile})
	addr := srv.HTTPAddr().String()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(pool, "")))
	require.NoError(t, err)
	defer conn.Close()
	checkGRPC(t, conn)
	for _, h2 := range []bool{false, true} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: h2}
		hc := &http.Client{Transport: tr}
		resp, err := hc.Get("https://" + addr + "/v2/health/live")
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, 200, resp.StatusCode)
		if h2 {
			assert.Equal(t, 2, resp.ProtoMajor)
		} else {
			assert.Equal(t, 1, resp.ProtoMajor)
		}
		r := do(t, hc, "POST", "https://"+addr+"/v2/models/affine/infer", []byte(inferJSON), nil)
		require.Equal(t, 200, r.code, string(r.body))
	}
}

func TestSinglePortConfig(t *testing.T) {
	cfg := testConfig(t.TempDir(), Config{})
	cfg.GRPCPort = PortOff
	_, err := New(cfg)
	require.ErrorContains(t, err, "cannot be turned off")
	cfg.SinglePort = true
	_, err = New(cfg)
	require.ErrorContains(t, err, "HTTP port, which is off")
}
