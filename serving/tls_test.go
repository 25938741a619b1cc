package serving

import (
	"context"
	"crypto/tls"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

func withAuth(ctx context.Context, value string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", value)
}

func TestTLS(t *testing.T) {
	certFile, keyFile, pool := testkit.SelfSigned(t, t.TempDir())
	srv, base := startAll(t, Config{TLSCertFile: certFile, TLSKeyFile: keyFile}, nil)
	require.True(t, srv.TLS())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(pool, "")))
	require.NoError(t, err)
	defer conn.Close()
	c := pb.NewGRPCInferenceServiceClient(conn)
	live, err := c.ServerLive(ctx, &pb.ServerLiveRequest{})
	require.NoError(t, err)
	assert.True(t, live.Live)
	_, err = c.ModelInfer(ctx, affineReq("", 1, 1, 2, 3, 4))
	require.NoError(t, err)

	plain, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer plain.Close()
	short, cancelShort := context.WithTimeout(ctx, 5*time.Second)
	defer cancelShort()
	_, err = pb.NewGRPCInferenceServiceClient(plain).ServerLive(short, &pb.ServerLiveRequest{})
	require.Error(t, err, "plaintext gRPC is refused")

	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	assert.Equal(t, "https", base[:5])
	r := do(t, hc, "POST", base+"/v2/models/affine/infer", []byte(`{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`), nil)
	require.Equal(t, 200, r.code, string(r.body))
	// Go's TLS server answers plaintext HTTP with a 400, never a v2 reply.
	if resp, err := http.Get("http://" + srv.HTTPAddr().String() + "/v2/health/live"); err == nil {
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
		resp.Body.Close()
	}
}

func TestAutoThreadsFitInstances(t *testing.T) {
	t.Setenv("KILN_NUM_THREADS", "")
	prev := core.NumThreads()
	defer core.SetNumThreads(prev)
	// affine runs 2 instances: each gets half the CPUs.
	start(t, Config{})
	assert.Equal(t, max(1, runtime.NumCPU()/2), core.NumThreads())
}
