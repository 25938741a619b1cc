# syntax=docker/dockerfile:1
# Kiln model server image: Debian bookworm, libtorch from Debian, non-root.
#
#   docker build -t kilnml/kiln:0.1.0 .
#   docker run --rm -p 8000-8002:8000-8002 -v "$PWD/build/repository:/models:ro" \
#       kilnml/kiln:0.1.0 serve --model-repository /models
#
# Stage 1 builds the kiln command with cgo against Debian's libtorch-dev;
# stage 2 carries only the shared libraries it links (libtorch1.13,
# OpenBLAS's pthread variant as libblas/liblapack, Gloo) and the binary.

ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
# Debian's packages are not pinned to a version (DL3008): bookworm's
# security updates replace them, and a pinned one disappears from the mirror.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y -q --no-install-recommends \
        libtorch-dev libgloo-dev libopenblas-dev g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# scripts/env.sh sets the cgo flags for Debian's libtorch.
RUN eval "$(scripts/env.sh --print)" \
 && CGO_ENABLED=1 go build -trimpath -ldflags="-s -w" -o /out/kiln ./cmd/kiln

FROM debian:bookworm-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y -q --no-install-recommends \
        libtorch1.13 libgloo0 libopenblas0-pthread ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && update-alternatives --set libblas.so.3-x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
 && update-alternatives --set liblapack.so.3-x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/openblas-pthread/liblapack.so.3 \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid kiln --home-dir /var/lib/kiln --shell /usr/sbin/nologin kiln \
 && install -d -o kiln -g kiln /var/lib/kiln /models
COPY --from=build /out/kiln /usr/local/bin/kiln
# KServe mounts models at /mnt/models; the Helm chart mounts a volume or
# names an s3:// repository. Caches and Flight datasets go to KILN_HOME
# (an emptyDir when the root filesystem is read-only).
ENV KILN_HOME=/var/lib/kiln HOME=/var/lib/kiln
USER 10001:10001
WORKDIR /var/lib/kiln
# HTTP/REST, gRPC, metrics, Arrow Flight.
EXPOSE 8000 8001 8002 8815
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["serve", "--model-repository", "/models"]
