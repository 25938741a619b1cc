#!/bin/sh
# Regenerates the Go code for proto/*.proto with protoc and the
# protoc-gen-go / protoc-gen-go-grpc versions pinned as tools in go.mod.
# Run through `go generate ./serving/inferencepb`.
set -eu
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/" google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc
protoc -I ../../proto \
	--plugin=protoc-gen-go="$bin/protoc-gen-go" \
	--plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
	--go_out=. --go_opt=paths=source_relative \
	--go-grpc_out=. --go-grpc_opt=paths=source_relative \
	model_config.proto grpc_service.proto
