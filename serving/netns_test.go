package serving

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kilnml/kiln/internal/testkit"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/auth"
)

// netnsClientEnv carries a netnsTarget to TestNetnsClient, the client half
// of TestControlFromAnotherHost, which runs in another network namespace.
const netnsClientEnv = "KILN_TEST_NETNS_CLIENT"

// netnsTarget is what the client half calls: the server's addresses as
// seen from the namespace, and the token to present (none when empty).
type netnsTarget struct {
	GRPC, HTTP, Flight string
	Token              string
}

// TestControlFromAnotherHost is the end-to-end check of the auth policy's
// network rule (issue 12, failure 6): a server on every interface with the
// default configuration (no token) serves inference to a client on another
// host, here a network namespace joined by a veth pair, but refuses its
// control calls (repository load/unload/index, Flight datasets, actions
// and training) with PERMISSION_DENIED / 403, while the same calls from
// loopback succeed; with a token the other host's control calls need it and
// succeed with it.
func TestControlFromAnotherHost(t *testing.T) {
	ns := testkit.NewNetNS(t)
	for _, token := range []string{"", testToken} {
		t.Run(fmt.Sprintf("token=%t", token != ""), func(t *testing.T) {
			root := testkit.CopyFixture(t, "serving-repo")
			cfg := testConfig(root, Config{Auth: auth.Config{Token: token}})
			cfg.Host = "" // every interface: the default of kiln serve
			cfg.HTTPPort, cfg.FlightPort, cfg.DataDir = 0, 0, t.TempDir()
			srv, err := New(cfg)
			require.NoError(t, err)
			require.NoError(t, srv.Start(context.Background()))
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				assert.NoError(t, srv.Shutdown(ctx))
			})
			at := func(a net.Addr) string {
				return net.JoinHostPort(ns.Host.String(), strconv.Itoa(a.(*net.TCPAddr).Port))
			}
			target := netnsTarget{GRPC: at(srv.GRPCAddr()), HTTP: at(srv.HTTPAddr()), Flight: at(srv.FlightAddr())}

			remote := runNetnsClient(t, ns, target)
			local := netnsCalls(t, netnsTarget{
				GRPC: srv.GRPCAddr().String(), HTTP: srv.HTTPAddr().String(), Flight: srv.FlightAddr().String(),
			})
			t.Logf("from %s: %v", ns.Peer, remote)
			t.Logf("from loopback: %v", local)
			for _, call := range []string{"grpc ModelInfer", "http infer"} {
				assert.Equal(t, "OK", remote[call], "inference from another host: %s", call)
				assert.Equal(t, "OK", local[call], call)
			}
			controls := []string{
				"grpc RepositoryIndex", "grpc RepositoryModelLoad", "grpc RepositoryModelUnload",
				"http index", "http load", "flight ListFlights", "flight DoAction train", "flight DoPut",
			}
			for _, call := range controls {
				if token == "" {
					assert.Equal(t, "PermissionDenied", remote[call], "control from another host without a token: %s", call)
					assert.Equal(t, "OK", local[call], "control from loopback without a token: %s", call)
				} else {
					assert.Equal(t, "Unauthenticated", remote[call], "control without the token: %s", call)
					assert.Equal(t, "Unauthenticated", local[call], "control from loopback without the token: %s", call)
				}
			}
			if token != "" {
				target.Token = token
				withToken := runNetnsClient(t, ns, target)
				t.Logf("from %s with the token: %v", ns.Peer, withToken)
				for _, call := range append(controls, "grpc ModelInfer", "http infer") {
					assert.Equal(t, "OK", withToken[call], "with the token from another host: %s", call)
				}
			}
			// The refused calls changed nothing: the model is still served.
			conn, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			require.NoError(t, err)
			defer conn.Close()
			_, err = pb.NewGRPCInferenceServiceClient(conn).ModelInfer(context.Background(), affineReq("", 1, 1, 2, 3, 4))
			require.NoError(t, err)
		})
	}
}

// runNetnsClient runs TestNetnsClient (this test binary) inside ns against
// target and returns its results: call name → gRPC code name ("OK", or an
// HTTP status mapped to the code it stands for).
func runNetnsClient(t *testing.T, ns *testkit.NetNS, target netnsTarget) map[string]string {
	t.Helper()
	raw, err := json.Marshal(target)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := ns.Command(ctx, os.Args[0], "-test.run", "^TestNetnsClient$", "-test.count", "1")
	cmd.Env = append(os.Environ(), netnsClientEnv+"="+string(raw))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	require.NoError(t, cmd.Run(), "client in %s: %s\n%s", ns.Name, stdout.String(), stderr.String())
	for _, line := range strings.Split(stdout.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "NETNS-RESULTS "); ok {
			var results map[string]string
			require.NoError(t, json.Unmarshal([]byte(rest), &results))
			return results
		}
	}
	t.Fatalf("client in %s printed no results: %s\n%s", ns.Name, stdout.String(), stderr.String())
	return nil
}

// TestNetnsClient is the client half of TestControlFromAnotherHost; it runs
// only when that test starts it in another namespace.
func TestNetnsClient(t *testing.T) {
	raw := os.Getenv(netnsClientEnv)
	if raw == "" {
		t.Skip("the client half of TestControlFromAnotherHost")
	}
	var target netnsTarget
	require.NoError(t, json.Unmarshal([]byte(raw), &target))
	results := netnsCalls(t, target)
	out, err := json.Marshal(results)
	require.NoError(t, err)
	fmt.Printf("NETNS-RESULTS %s\n", out)
}

// netnsCalls makes one call of each kind (inference and control, on gRPC,
// HTTP and Flight) and returns each call's outcome as a gRPC code name.
func netnsCalls(t *testing.T, target netnsTarget) map[string]string {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	results := map[string]string{}
	grpcCode := func(name string, err error) { results[name] = status.Code(err).String() }
	dial := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	cctx := ctx
	if target.Token != "" {
		cctx = withAuth(ctx, "Bearer "+target.Token)
	}

	conn, err := grpc.NewClient(target.GRPC, dial...)
	require.NoError(t, err)
	defer conn.Close()
	c := pb.NewGRPCInferenceServiceClient(conn)
	_, err = c.ModelInfer(cctx, affineReq("", 1, 1, 2, 3, 4))
	grpcCode("grpc ModelInfer", err)
	_, err = c.RepositoryIndex(cctx, &pb.RepositoryIndexRequest{})
	grpcCode("grpc RepositoryIndex", err)
	// Unload a model that is not loaded ("explicit" is in the repository
	// but not served here), then load it: both are control calls that
	// succeed when allowed and leave "affine" served.
	_, err = c.RepositoryModelUnload(cctx, &pb.RepositoryModelUnloadRequest{ModelName: "affine_copy_unused"})
	if status.Code(err) == codes.NotFound {
		err = nil // allowed, and answered: the model does not exist
	}
	grpcCode("grpc RepositoryModelUnload", err)
	_, err = c.RepositoryModelLoad(cctx, &pb.RepositoryModelLoadRequest{ModelName: "affine"})
	grpcCode("grpc RepositoryModelLoad", err)

	httpCall := func(name, path, body string) {
		req, err := http.NewRequestWithContext(ctx, "POST", "http://"+target.HTTP+path, strings.NewReader(body))
		require.NoError(t, err)
		req.Header.Set("Content-Type", "application/json")
		if target.Token != "" {
			req.Header.Set("Authorization", "Bearer "+target.Token)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err, name)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusOK:
			results[name] = codes.OK.String()
		case http.StatusUnauthorized:
			results[name] = codes.Unauthenticated.String()
		case http.StatusForbidden:
			results[name] = codes.PermissionDenied.String()
		default:
			results[name] = fmt.Sprintf("HTTP %d", resp.StatusCode)
		}
	}
	httpCall("http infer", "/v2/models/affine/infer", `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}`)
	httpCall("http index", "/v2/repository/index", "")
	httpCall("http load", "/v2/repository/models/affine/load", "")

	fc, err := flight.NewClientWithMiddleware(target.Flight, nil, nil, dial...)
	require.NoError(t, err)
	defer fc.Close()
	list, err := fc.ListFlights(cctx, &flight.Criteria{})
	if err == nil {
		for err == nil {
			_, err = list.Recv()
		}
		if err == io.EOF {
			err = nil
		}
	}
	grpcCode("flight ListFlights", err)
	// A train action naming a dataset that does not exist: allowed, it is
	// answered NOT_FOUND (no job starts); refused, PERMISSION_DENIED or
	// UNAUTHENTICATED comes first.
	act, err := fc.DoAction(cctx, &flight.Action{Type: "train", Body: []byte(`{"dataset":"no_such_dataset","model":"m"}`)})
	if err == nil {
		_, err = act.Recv()
	}
	if c := status.Code(err); c == codes.NotFound || c == codes.InvalidArgument {
		err = nil
	}
	grpcCode("flight DoAction train", err)
	put, err := fc.DoPut(cctx)
	if err == nil {
		// An empty upload: refused before any data when not allowed;
		// allowed, the server answers that no schema came.
		err = put.CloseSend()
		if err == nil {
			_, err = put.Recv()
		}
	}
	if c := status.Code(err); c == codes.InvalidArgument {
		err = nil
	}
	grpcCode("flight DoPut", err)
	return results
}
