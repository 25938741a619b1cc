// Package auth checks the optional bearer token that guards Kiln's
// repository and management calls, on gRPC (metadata "authorization") and
// HTTP (header "Authorization").
package auth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ProtectedGRPCMethods are the full gRPC method names that need the token:
// the model repository extension (index, load, unload).
var ProtectedGRPCMethods = []string{
	"/inference.GRPCInferenceService/RepositoryIndex",
	"/inference.GRPCInferenceService/RepositoryModelLoad",
	"/inference.GRPCInferenceService/RepositoryModelUnload",
}

// Token is a bearer token; the zero Token (no token) allows every call.
type Token struct {
	sum [32]byte
	set bool
}

// New returns a Token for secret; an empty secret disables the check.
func New(secret string) Token {
	if secret == "" {
		return Token{}
	}
	return Token{sum: sha256.Sum256([]byte(secret)), set: true}
}

// Enabled reports whether a token is required.
func (t Token) Enabled() bool { return t.set }

// Check reports whether an "Authorization" value ("Bearer <token>",
// scheme case-insensitive) carries the token, in constant time.
func (t Token) Check(authorization string) bool {
	if !t.set {
		return true
	}
	scheme, cred, ok := strings.Cut(strings.TrimSpace(authorization), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	got := sha256.Sum256([]byte(strings.TrimSpace(cred)))
	return subtle.ConstantTimeCompare(got[:], t.sum[:]) == 1
}

func (t Token) checkContext(ctx context.Context, method string) error {
	if !t.set || !protected(method) {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if t.Check(v) {
			return nil
		}
	}
	return status.Errorf(codes.Unauthenticated, "%s needs a valid bearer token (metadata \"authorization: Bearer <token>\")", method)
}

func protected(method string) bool {
	for _, m := range ProtectedGRPCMethods {
		if m == method {
			return true
		}
	}
	return false
}

// UnaryInterceptor refuses ProtectedGRPCMethods without the token with
// UNAUTHENTICATED.
func (t Token) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if err := t.checkContext(ctx, info.FullMethod); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
}

// StreamInterceptor is UnaryInterceptor for streaming methods.
func (t Token) StreamInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if err := t.checkContext(ss.Context(), info.FullMethod); err != nil {
			return err
		}
		return handler(srv, ss)
	}
}

// CheckHTTP reports whether r carries the token in its Authorization
// header.
func (t Token) CheckHTTP(r *http.Request) bool {
	if !t.set {
		return true
	}
	for _, v := range r.Header.Values("Authorization") {
		if t.Check(v) {
			return true
		}
	}
	return false
}
