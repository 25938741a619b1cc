// Package auth is Kiln's one authentication policy, shared by the KServe
// gRPC service (metadata "authorization"), HTTP/REST (header
// "Authorization") and Arrow Flight (the same header, plus Flight's
// basic-auth handshake that issues tokens).
//
// Every call has a Scope. Open calls (health, liveness, readiness, server
// metadata, Flight's handshake) never need a token. Control calls (the
// model repository API, Flight datasets and training jobs) need one
// whenever the policy has a token or users. Inference calls (inference,
// model metadata, configuration and statistics, Flight DoExchange) need
// one only when Config.Inference is set, as Triton's restricted
// "inference" protocol group does.
//
// A policy without token and users (the default) lets Open and Inference
// calls through from anywhere, and Control calls only from the loopback
// interface (127.0.0.0/8, ::1) or a Unix socket: no default configuration
// lets an unauthenticated client on the network write to disk, train,
// load, unload or replace a serving model. Such a client gets
// PERMISSION_DENIED (HTTP 403) naming --auth-token.
//
// Tokens are compared in constant time (SHA-256 digests); a static token
// must be at least MinTokenLength characters, everywhere.
package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/apache/arrow-go/v18/arrow/flight"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// MinTokenLength is the shortest static bearer token accepted: 16
// characters (Arrow Flight's own minimum, applied to every surface).
const MinTokenLength = 16

// DefaultTokenTTL is how long a token issued by the Flight handshake stays
// valid unless Config.TokenTTL says otherwise.
const DefaultTokenTTL = 24 * time.Hour

// Scope is the kind of a call, which decides whether it needs a token.
type Scope int

const (
	// Open calls never need a token: health, liveness, readiness, server
	// metadata, Flight's handshake.
	Open Scope = iota
	// Inference calls need a token when Config.Inference is set:
	// inference, model metadata, configuration and statistics, Flight
	// DoExchange.
	Inference
	// Control calls need a token whenever the policy is enabled: the
	// model repository API (index, load, unload), Flight datasets (DoPut,
	// DoGet, listing) and actions (training jobs).
	Control
)

// String names the scope.
func (s Scope) String() string {
	switch s {
	case Open:
		return "open"
	case Inference:
		return "inference"
	case Control:
		return "control"
	}
	return fmt.Sprintf("Scope(%d)", int(s))
}

// Config configures a Policy. The zero Config turns authentication off.
type Config struct {
	// Token is a static bearer token (at least MinTokenLength characters).
	Token string
	// TokenFile, when set, is a file whose content (surrounding white
	// space trimmed) is the static token; it and Token exclude each other.
	TokenFile string
	// Users maps user names to passwords for Flight's basic-auth
	// handshake, which issues bearer tokens valid on every surface.
	Users map[string]string
	// TokenTTL is the lifetime of handshake tokens (default
	// DefaultTokenTTL).
	TokenTTL time.Duration
	// Inference makes Inference calls need a token too.
	Inference bool
}

// Policy decides which calls need a bearer token and checks tokens. Its
// methods are safe for concurrent use; a nil *Policy is the policy of the
// zero Config (no token: Control calls from loopback only).
type Policy struct {
	static    [][32]byte // SHA-256 of the static tokens
	users     map[string]string
	ttl       time.Duration
	inference bool
	now       func() time.Time

	mu     sync.Mutex
	issued map[string]issuedToken
}

type issuedToken struct {
	identity string
	expires  time.Time
}

// New returns the policy cfg describes. It fails when the token is
// shorter than MinTokenLength, when both Token and TokenFile are set, when
// TokenFile cannot be read or is empty, and when Inference is set with no
// token and no users (nobody could call inference).
func New(cfg Config) (*Policy, error) {
	tok := cfg.Token
	if cfg.TokenFile != "" {
		if tok != "" {
			return nil, errors.New("auth: a token and a token file were both given; use one")
		}
		raw, err := os.ReadFile(cfg.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("auth: token file: %w", err)
		}
		if tok = strings.TrimSpace(string(raw)); tok == "" {
			return nil, fmt.Errorf("auth: token file %s is empty", cfg.TokenFile)
		}
	}
	p := &Policy{users: cfg.Users, ttl: cfg.TokenTTL, inference: cfg.Inference, now: time.Now, issued: map[string]issuedToken{}}
	if tok != "" {
		if len(tok) < MinTokenLength {
			return nil, fmt.Errorf("auth: the bearer token has %d characters; it must have at least %d", len(tok), MinTokenLength)
		}
		p.static = append(p.static, sha256.Sum256([]byte(tok)))
	}
	if p.ttl <= 0 {
		p.ttl = DefaultTokenTTL
	}
	if cfg.Inference && !p.Enabled() {
		return nil, errors.New("auth: protecting inference needs a token or users")
	}
	return p, nil
}

// Enabled reports whether the policy has a token or users, so that
// Control calls need a token.
func (p *Policy) Enabled() bool { return p != nil && (len(p.static) > 0 || len(p.users) > 0) }

// Required reports whether calls of scope s need a token.
func (p *Policy) Required(s Scope) bool {
	if !p.Enabled() {
		return false
	}
	switch s {
	case Control:
		return true
	case Inference:
		return p.inference
	}
	return false
}

// IsValid returns the identity a bearer token authenticates: "token" for
// the static token, the user name for a token the handshake issued. It
// implements flight.BasicAuthValidator.
func (p *Policy) IsValid(token string) (any, error) {
	if p != nil && token != "" {
		sum := sha256.Sum256([]byte(token))
		for _, s := range p.static {
			if subtle.ConstantTimeCompare(sum[:], s[:]) == 1 {
				return "token", nil
			}
		}
		p.mu.Lock()
		it, ok := p.issued[token]
		p.mu.Unlock()
		if ok && p.now().Before(it.expires) {
			return it.identity, nil
		}
	}
	return nil, status.Error(codes.Unauthenticated, "invalid or expired bearer token")
}

// Validate checks a user's password and issues a bearer token valid for
// Config.TokenTTL. It implements flight.BasicAuthValidator.
func (p *Policy) Validate(user, password string) (string, error) {
	want, ok := p.users[user]
	if !ok {
		want = "\x00never matches" // compare anyway, so timing does not reveal users
	}
	if subtle.ConstantTimeCompare([]byte(want), []byte(password)) != 1 || !ok {
		return "", status.Error(codes.Unauthenticated, "invalid user name or password")
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", status.Errorf(codes.Internal, "issuing a token: %v", err)
	}
	tok := hex.EncodeToString(b[:])
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for t, it := range p.issued { // drop expired tokens
		if now.After(it.expires) {
			delete(p.issued, t)
		}
	}
	p.issued[tok] = issuedToken{identity: user, expires: now.Add(p.ttl)}
	return tok, nil
}

// checkAuthorization reports whether one of the "Authorization" values
// ("Bearer <token>", scheme case-insensitive) carries a valid token.
func (p *Policy) checkAuthorization(values []string) bool {
	for _, v := range values {
		scheme, cred, ok := strings.Cut(strings.TrimSpace(v), " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			continue
		}
		if _, err := p.IsValid(strings.TrimSpace(cred)); err == nil {
			return true
		}
	}
	return false
}

// Check decides a call of scope s from peer (nil when unknown) carrying
// the "Authorization" values: nil when it may proceed, else a gRPC status
// error, UNAUTHENTICATED when a valid bearer token is missing and
// PERMISSION_DENIED when an unauthenticated policy refuses a Control call
// from another host. what names the call in the message.
func (p *Policy) Check(s Scope, peer net.Addr, authorization []string, what string) error {
	if p.Required(s) {
		if p.checkAuthorization(authorization) {
			return nil
		}
		return status.Errorf(codes.Unauthenticated, "%s needs a valid bearer token (\"authorization: Bearer <token>\")", what)
	}
	if s == Control && !p.Enabled() && !Loopback(peer) {
		return status.Errorf(codes.PermissionDenied,
			"%s changes the server (repository, datasets or training): without --auth-token only clients on this host (loopback) may call it; start the server with --auth-token and send \"authorization: Bearer <token>\"", what)
	}
	return nil
}

// Loopback reports whether addr is a loopback TCP/UDP address (127.0.0.0/8,
// ::1, IPv4-mapped loopback) or a Unix socket; nil is not.
func Loopback(addr net.Addr) bool {
	switch a := addr.(type) {
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	case *net.UDPAddr:
		return a.IP.IsLoopback()
	case *net.UnixAddr:
		return true
	case nil:
		return false
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		host = addr.String()
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// httpPeer is the address of r's client.
func httpPeer(r *http.Request) net.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return nil
	}
	return net.TCPAddrFromAddrPort(ap)
}

// CheckHTTP is Check for an HTTP request: its client address and
// Authorization header.
func (p *Policy) CheckHTTP(r *http.Request, s Scope) error {
	return p.Check(s, httpPeer(r), r.Header.Values("Authorization"), r.URL.Path)
}

// grpcPeer is the address of the gRPC call's client.
func grpcPeer(ctx context.Context) net.Addr {
	if pr, ok := peer.FromContext(ctx); ok {
		return pr.Addr
	}
	return nil
}

// ScopeFunc returns the scope of a gRPC method ("/package.Service/Method").
type ScopeFunc func(fullMethod string) Scope

// checkGRPC is Check for a gRPC call.
func (p *Policy) checkGRPC(ctx context.Context, method string, scope ScopeFunc) error {
	md, _ := metadata.FromIncomingContext(ctx)
	return p.Check(scope(method), grpcPeer(ctx), md.Get("authorization"), method)
}

// GRPCServerOptions returns the interceptors that enforce the policy on a
// gRPC server whose methods scope classifies.
func (p *Policy) GRPCServerOptions(scope ScopeFunc) []grpc.ServerOption {
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if err := p.checkGRPC(ctx, info.FullMethod, scope); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if err := p.checkGRPC(ss.Context(), info.FullMethod, scope); err != nil {
			return err
		}
		return handler(srv, ss)
	}
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream)}
}

// FlightServerOptions returns the interceptors that enforce the policy on
// an Arrow Flight server. With a token or users, Handshake runs Flight's
// basic-auth exchange (arrow-go's bearer-token interceptors, with the
// policy as validator) and every method whose FlightScope requires it
// needs a bearer token; without them, Control methods are refused to
// clients on other hosts (see Check).
func (p *Policy) FlightServerOptions() []grpc.ServerOption {
	if !p.Enabled() {
		return p.GRPCServerOptions(FlightScope)
	}
	fu, fs := flight.CreateServerBearerTokenAuthInterceptors(p)
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if !p.Required(FlightScope(info.FullMethod)) {
			return handler(ctx, req)
		}
		return fu(ctx, req, info, handler)
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if !strings.HasSuffix(info.FullMethod, "/Handshake") && !p.Required(FlightScope(info.FullMethod)) {
			return handler(srv, ss)
		}
		return fs(srv, ss, info, handler)
	}
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream)}
}

// KServeScope classifies the methods of the KServe v2 gRPC service
// (inference.GRPCInferenceService) and grpc.health.v1.
func KServeScope(fullMethod string) Scope {
	switch fullMethod {
	case "/inference.GRPCInferenceService/RepositoryIndex",
		"/inference.GRPCInferenceService/RepositoryModelLoad",
		"/inference.GRPCInferenceService/RepositoryModelUnload":
		return Control
	case "/inference.GRPCInferenceService/ServerLive",
		"/inference.GRPCInferenceService/ServerReady",
		"/inference.GRPCInferenceService/ModelReady",
		"/inference.GRPCInferenceService/ServerMetadata":
		return Open
	}
	if strings.HasPrefix(fullMethod, "/grpc.health.v1.Health/") {
		return Open
	}
	return Inference
}

// FlightScope classifies the methods of arrow.flight.protocol.FlightService:
// Handshake is Open, DoExchange (batch inference) is Inference, every other
// method (datasets, actions) is Control.
func FlightScope(fullMethod string) Scope {
	switch fullMethod[strings.LastIndexByte(fullMethod, '/')+1:] {
	case "Handshake":
		return Open
	case "DoExchange":
		return Inference
	}
	return Control
}
