// Package inferencepb holds the Go code protoc generates for the KServe v2 /
// Triton inference protocol (package inference): proto/grpc_service.proto
// and proto/model_config.proto. The generated files are committed; rerun
// `go generate ./serving/inferencepb` (needs protoc on PATH) after editing
// the .proto files.
package inferencepb

//go:generate sh gen.sh
