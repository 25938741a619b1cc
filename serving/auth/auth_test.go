package auth

import (
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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
	assert.False(t, p.CheckHTTP(req, Control))
	assert.True(t, p.CheckHTTP(req, Inference))
	req.Header.Set("Authorization", "bearer "+tok)
	assert.True(t, p.CheckHTTP(req, Control))
	req.Header.Set("Authorization", "Bearer "+tok+"x")
	assert.False(t, p.CheckHTTP(req, Control))
	req.Header.Set("Authorization", "Basic "+tok)
	assert.False(t, p.CheckHTTP(req, Control))

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
	assert.True(t, p.CheckHTTP(req, Control))
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
