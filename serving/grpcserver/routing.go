package grpcserver

import (
	"context"
	"net/http"
	"strconv"

	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/manager"
	"google.golang.org/grpc/metadata"
)

type headersKey struct{}

// WithHeaders returns ctx carrying an HTTP request's headers, so that a
// REST request routed through the service reads its routing key (a
// rollout's sticky header) from them, as a gRPC request reads it from its
// metadata.
func WithHeaders(ctx context.Context, h http.Header) context.Context {
	return context.WithValue(ctx, headersKey{}, h)
}

// routingKey returns the manager.KeyFunc of a request: the value of its
// parameter (string, integer or boolean) named by the split, else of its
// gRPC metadata or HTTP header.
func routingKey(ctx context.Context, req *pb.ModelInferRequest) manager.KeyFunc {
	return func(parameter, header string) string {
		if parameter != "" {
			if p, ok := req.GetParameters()[parameter]; ok {
				switch x := p.GetParameterChoice().(type) {
				case *pb.InferParameter_StringParam:
					return x.StringParam
				case *pb.InferParameter_Int64Param:
					return strconv.FormatInt(x.Int64Param, 10)
				case *pb.InferParameter_Uint64Param:
					return strconv.FormatUint(x.Uint64Param, 10)
				case *pb.InferParameter_BoolParam:
					return strconv.FormatBool(x.BoolParam)
				}
			}
		}
		if header == "" {
			return ""
		}
		if h, ok := ctx.Value(headersKey{}).(http.Header); ok {
			if v := h.Get(header); v != "" {
				return v
			}
		}
		if vs := metadata.ValueFromIncomingContext(ctx, header); len(vs) > 0 {
			return vs[0]
		}
		return ""
	}
}
