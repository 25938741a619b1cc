package flightserver

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"sync"
	"time"

	"github.com/apache/arrow-go/v18/arrow/flight"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultTokenTTL is how long a token issued by the handshake stays valid
// unless Auth.TokenTTL says otherwise.
const DefaultTokenTTL = 24 * time.Hour

// Auth configures bearer-token authentication. With it every call but the
// handshake needs an "authorization: Bearer TOKEN" header, where TOKEN is
// one of Tokens or one that the Flight basic-auth handshake issued (a
// Handshake call with an "authorization: Basic base64(user:password)"
// header, answered with the token in an "authorization: Bearer" trailer, as
// pyarrow's FlightClient.authenticate_basic_token does).
type Auth struct {
	// Users maps user names to passwords accepted by the handshake.
	Users map[string]string
	// Tokens maps static bearer tokens to the identity they authenticate.
	Tokens map[string]string
	// TokenTTL is the lifetime of handshake tokens (default
	// DefaultTokenTTL).
	TokenTTL time.Duration
}

// authenticator implements flight.BasicAuthValidator over an Auth.
type authenticator struct {
	cfg Auth
	now func() time.Time

	mu     sync.Mutex
	issued map[string]issuedToken
}

type issuedToken struct {
	identity string
	expires  time.Time
}

func newAuthenticator(cfg Auth) (*authenticator, error) {
	if len(cfg.Users) == 0 && len(cfg.Tokens) == 0 {
		return nil, fmt.Errorf("auth: no users and no tokens: nobody could call the service")
	}
	for tok := range cfg.Tokens {
		if len(tok) < 16 {
			return nil, fmt.Errorf("auth: static tokens must be at least 16 characters")
		}
	}
	if cfg.TokenTTL <= 0 {
		cfg.TokenTTL = DefaultTokenTTL
	}
	return &authenticator{cfg: cfg, now: time.Now, issued: map[string]issuedToken{}}, nil
}

// equal compares secrets in constant time.
func equal(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }

// Validate checks a user's password and issues a token.
func (a *authenticator) Validate(user, password string) (string, error) {
	want, ok := a.cfg.Users[user]
	if !ok {
		want = "\x00never matches" // compare anyway, so timing does not reveal users
	}
	if !equal(want, password) || !ok {
		return "", status.Error(codes.Unauthenticated, "invalid user name or password")
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", status.Errorf(codes.Internal, "issuing a token: %v", err)
	}
	tok := hex.EncodeToString(b[:])
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	for t, it := range a.issued { // drop expired tokens
		if now.After(it.expires) {
			delete(a.issued, t)
		}
	}
	a.issued[tok] = issuedToken{identity: user, expires: now.Add(a.cfg.TokenTTL)}
	return tok, nil
}

// IsValid returns the identity a bearer token authenticates.
func (a *authenticator) IsValid(token string) (any, error) {
	for t, id := range a.cfg.Tokens {
		if equal(t, token) {
			return id, nil
		}
	}
	a.mu.Lock()
	it, ok := a.issued[token]
	a.mu.Unlock()
	if ok && a.now().Before(it.expires) {
		return it.identity, nil
	}
	return nil, status.Error(codes.Unauthenticated, "invalid or expired bearer token")
}

// interceptors returns the gRPC interceptors that enforce a.
func (a *authenticator) interceptors() []grpc.ServerOption {
	unary, stream := flight.CreateServerBearerTokenAuthInterceptors(a)
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream)}
}
