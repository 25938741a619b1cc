package auth

import (
	"context"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

const tok = "0123456789abcdef-token"

func TestScopes(t *testing.T) {
	off, err := New(Config{})
	require.NoError(t, err)
	on, err := New(Config{Token: tok})
	require.NoError(t, err)
	inf, err := New(Config{Token: tok, Inference: true})
	require.NoError(t, err)
	for _, c := range []struct {
		p                      *Policy
		open, inference, admin bool
	}{{nil, false, false, false}, {off, false, false, false}, {on, false, false, true}, {inf, false, true, true}} {
		assert.Equal(t, c.open, c.p.Required(Open))
		assert.Equal(t, c.inference, c.p.Required(Inference))
		assert.Equal(t, c.admin, c.p.Required(Control))
	}
	assert.Equal(t, Control, KServeScope("/inference.GRPCInferenceService/RepositoryModelLoad"))
	assert.Equal(t, Inference, KServeScope("/inference.GRPCInferenceService/ModelInfer"))
	assert.Equal(t, Inference, KServeScope("/inference.GRPCInferenceService/ModelStreamInfer"))
	assert.Equal(t, Open, KServeScope("/inference.GRPCInferenceService/ServerReady"))
	assert.Equal(t, Open, KServeScope("/grpc.health.v1.Health/Check"))
	assert.Equal(t, Open, FlightScope("/arrow.flight.protocol.FlightService/Handshake"))
	assert.Equal(t, Inference, FlightScope("/arrow.flight.protocol.FlightService/DoExchange"))
	assert.Equal(t, Control, FlightScope("/arrow.flight.protocol.FlightService/DoPut"))
	assert.Equal(t, Control, FlightScope("/arrow.flight.protocol.FlightService/DoAction"))
}

func TestTokens(t *testing.T) {
	p, err := New(Config{Token: tok, Users: map[string]string{"alice": "pw"}})
	require.NoError(t, err)
	req := httptest.NewRequest("POST", "/v2/repository/index", nil)
	assert.Equal(t, codes.Unauthenticated, status.Code(p.CheckHTTP(req, Control)))
	assert.NoError(t, p.CheckHTTP(req, Inference))
	req.Header.Set("Authorization", "bearer "+tok)
	assert.NoError(t, p.CheckHTTP(req, Control))
	req.Header.Set("Authorization", "Bearer "+tok+"x")
	assert.Error(t, p.CheckHTTP(req, Control))
	req.Header.Set("Authorization", "Basic "+tok)
	assert.Error(t, p.CheckHTTP(req, Control))

	_, err = p.Validate("alice", "wrong")
	require.Error(t, err)
	_, err = p.Validate("mallory", "pw")
	require.Error(t, err)
	issued, err := p.Validate("alice", "pw")
	require.NoError(t, err)
	id, err := p.IsValid(issued)
	require.NoError(t, err)
	assert.Equal(t, "alice", id)
	req.Header.Set("Authorization", "Bearer "+issued) // a handshake token works on HTTP too
	assert.NoError(t, p.CheckHTTP(req, Control))
	p.now = func() time.Time { return time.Now().Add(DefaultTokenTTL + time.Minute) }
	_, err = p.IsValid(issued)
	require.Error(t, err, "expired")
}

func TestNewErrors(t *testing.T) {
	_, err := New(Config{Token: "short"})
	require.ErrorContains(t, err, "at least 16")
	_, err = New(Config{Inference: true})
	require.ErrorContains(t, err, "needs a token")
	file := filepath.Join(t.TempDir(), "token")
	_, err = New(Config{TokenFile: file})
	require.ErrorContains(t, err, "token file")
	require.NoError(t, os.WriteFile(file, []byte("  \n"), 0o600))
	_, err = New(Config{TokenFile: file})
	require.ErrorContains(t, err, "empty")
	require.NoError(t, os.WriteFile(file, []byte(tok+"\n"), 0o600))
	_, err = New(Config{TokenFile: file, Token: tok})
	require.ErrorContains(t, err, "both")
	p, err := New(Config{TokenFile: file})
	require.NoError(t, err)
	_, err = p.IsValid(tok)
	require.NoError(t, err, "the file's token, white space trimmed")
}

// TestControlFromLoopbackOnlyWithoutToken: the default policy (no token)
// refuses Control calls from other hosts with PERMISSION_DENIED and lets
// every other call through; a token lifts the host rule.
func TestControlFromLoopbackOnlyWithoutToken(t *testing.T) {
	for _, p := range []*Policy{nil, mustNew(t, Config{})} {
		remote := httptest.NewRequest("POST", "/v2/repository/models/m/load", nil) // 192.0.2.1
		err := p.CheckHTTP(remote, Control)
		assert.Equal(t, codes.PermissionDenied, status.Code(err))
		assert.ErrorContains(t, err, "--auth-token")
		assert.NoError(t, p.CheckHTTP(remote, Inference))
		assert.NoError(t, p.CheckHTTP(remote, Open))
		for _, a := range []string{"127.0.0.1:5000", "127.9.9.9:1", "[::1]:80", "[::ffff:127.0.0.1]:80"} {
			local := httptest.NewRequest("POST", "/v2/repository/index", nil)
			local.RemoteAddr = a
			assert.NoError(t, p.CheckHTTP(local, Control), a)
		}
		assert.Equal(t, codes.PermissionDenied, status.Code(p.Check(Control, nil, nil, "x")), "an unknown peer is not local")
		assert.NoError(t, p.Check(Control, &net.UnixAddr{Name: "/run/kiln.sock", Net: "unix"}, nil, "x"))
	}
	p := mustNew(t, Config{Token: tok})
	remote := httptest.NewRequest("POST", "/v2/repository/index", nil)
	remote.Header.Set("Authorization", "Bearer "+tok)
	assert.NoError(t, p.CheckHTTP(remote, Control))
}

func mustNew(t *testing.T, c Config) *Policy {
	t.Helper()
	p, err := New(c)
	require.NoError(t, err)
	return p
}

// TestGRPCInterceptorsUsePeer: the gRPC interceptors take the client's
// address from the call (grpc/peer) and the token from its metadata.
func TestGRPCInterceptorsUsePeer(t *testing.T) {
	call := func(p *Policy, ip string, md ...string) error {
		ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 4242}})
		ctx = metadata.NewIncomingContext(ctx, metadata.Pairs(md...))
		opts := p.GRPCServerOptions(KServeScope)
		require.Len(t, opts, 2)
		return p.checkGRPC(ctx, "/inference.GRPCInferenceService/RepositoryModelLoad", KServeScope)
	}
	assert.Equal(t, codes.PermissionDenied, status.Code(call(nil, "192.0.2.7")))
	assert.NoError(t, call(nil, "127.0.0.1"))
	p := mustNew(t, Config{Token: tok})
	assert.Equal(t, codes.Unauthenticated, status.Code(call(p, "127.0.0.1")))
	assert.NoError(t, call(p, "192.0.2.7", "authorization", "Bearer "+tok))
}
