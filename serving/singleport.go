package serving

import (
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
)

// grpcOrREST routes each request of the single port (Config.SinglePort):
// HTTP/2 requests with content-type application/grpc (and +proto, ...) go
// to the gRPC server through its http.Handler, with no read deadline (a
// streaming RPC may last as long as the client keeps it); the rest go to
// the REST handler.
func grpcOrREST(g *grpc.Server, rest http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			http.NewResponseController(w).SetReadDeadline(time.Time{})
			g.ServeHTTP(w, r)
			return
		}
		rest.ServeHTTP(w, r)
	})
}

// singlePort makes srv speak HTTP/1.1, h2c with prior knowledge and (with
// TLS) HTTP/2 by ALPN, with at most maxStreams concurrent streams per
// connection, as gRPC's own port allows.
func singlePort(srv *http.Server, maxStreams uint32) {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetHTTP2(true)
	p.SetUnencryptedHTTP2(true)
	srv.Protocols = &p
	srv.HTTP2 = &http.HTTP2Config{MaxConcurrentStreams: int(maxStreams)}
}
