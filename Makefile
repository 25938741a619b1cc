# Kiln — build, run, test and benchmark from a fresh machine.
#
#   make run     install what is missing, build, run Kiln's main job (kiln serve)
#   make test    install what is missing, build, run every Go and Python test
#   make bench   install what is missing, build, run the benchmarks
#   make soak    the 10-minute soak of the model server (SOAK_SECONDS)
#
# LIBTORCH=/path/with/include-and-lib selects another libtorch (for example
# a pip torch package directory); Debian's libtorch-dev is the default.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

# Every recipe line that builds or runs Go/Python code runs in the
# environment scripts/env.sh computes (cgo flags, PATH, KILN_PYTHON).
ENV := eval "$$(scripts/env.sh --print)" &&
PY := .venv/bin/python
DEMO := build/demo

.PHONY: deps console-assets build python run demo test test-go test-python test-fuzz test-deploy fuzz soak vet bench bench-serve bench-cluster bench-rollout clean

deps:
	scripts/install-deps

build: deps
	$(ENV) go build -o bin/kiln ./cmd/kiln

# The console's chart library (npm ci over serving/console/web's lockfile,
# copied into serving/console/dist for go:embed); install-deps runs it too.
console-assets:
	scripts/console-assets

# Kiln's main job, the whole life of its demo models on embedded defaults:
# scikit-learn's iris and digits as CSV (first run only), then Kiln's own
# pipelines (examples/pipeline/*.yaml) train, select, optimize, evaluate
# against production, register and promote them in a SQLite registry under
# build/run (each make run runs them again: the new candidates are
# evaluated against what production serves), and `kiln serve` serves each
# model's production version from that registry in the foreground: gRPC
# :8001, HTTP :8000, metrics :8002, Flight :8815 (examples/repository/README.md
# has queries).
RUN := build/run
run: build
	@test -f $(RUN)/data/digits.csv || $(ENV) $(PY) examples/pipeline/make_data.py $(RUN)/data
	$(ENV) bin/kiln pipeline run examples/pipeline/iris.yaml --registry $(RUN)/registry.db --runs-dir $(RUN)/pipelines
	$(ENV) bin/kiln pipeline run examples/pipeline/digits.yaml --registry $(RUN)/registry.db --runs-dir $(RUN)/pipelines
	$(ENV) bin/kiln registry ls --registry $(RUN)/registry.db
	mkdir -p $(RUN)/repository
	$(ENV) bin/kiln serve --model-repository $(RUN)/repository --registry $(RUN)/registry.db --data-dir $(RUN)/datasets

# The end-to-end batch prediction demo: Python torch trains a small iris
# classifier and exports it as TorchScript; Kiln loads it and runs batched
# inference over the held-out rows.
demo: build
	@test -f $(DEMO)/iris.pt || $(ENV) $(PY) examples/demo/make_model.py $(DEMO)
	$(ENV) bin/kiln version
	$(ENV) bin/kiln info $(DEMO)/iris.pt
	$(ENV) bin/kiln predict --model $(DEMO)/iris.pt --data $(DEMO)/iris_test.csv \
		--labels $(DEMO)/labels.txt --target species --batch-size 16 --top-k 2

vet: deps
	$(ENV) go vet ./...

test-go: deps
	$(ENV) go test -count=1 -timeout 30m ./...

# The kiln Python package (gopy over bindings/), installed into .venv the
# way a user installs it: pip install .
python: deps
	$(ENV) .venv/bin/pip install --no-build-isolation --no-deps -q .

# pytest exits 5 when it collects no test; that is a failure here too.
test-python: build python
	$(ENV) $(PY) -m pytest -q tests/python

# Every Go native fuzz target (func FuzzXxx), one at a time: briefly in
# `make test` (CI), long with `make fuzz` (FUZZTIME each), which prints
# each target's executions.
FUZZTIME ?= 60s
test-fuzz: deps
	$(ENV) scripts/fuzz 10s

fuzz: deps
	$(ENV) scripts/fuzz $(FUZZTIME)

# The deployment manifests (Helm chart, KServe, Kubeflow), offline:
# helm template, kubectl-validate, CRD schemas, kube-score (deploy/validate,
# a module of its own; the tools are pinned in deploy/tools/*/go.mod).
test-deploy: deps
	$(ENV) cd deploy/validate && go vet ./... && go test -count=1 ./...

test: vet test-go test-python test-fuzz test-deploy

# The soak (serving/soak_test.go): 256 clients of mixed valid and invalid
# gRPC, HTTP and Flight traffic for SOAK_SECONDS, then RSS, goroutines,
# open files and live native tensors checked flat. `make test` runs it
# once, for its default 60 s.
SOAK_SECONDS ?= 600
soak: deps
	$(ENV) KILN_SOAK_SECONDS=$(SOAK_SECONDS) go test -count=1 -v -run '^TestSoak$$' \
		-timeout $$(( $(SOAK_SECONDS) * 2 + 600 ))s ./serving/

bench: build
	$(ENV) go run ./bench/cgo
	$(ENV) go run ./bench/train
	$(ENV) $(PY) bench/python/bench.py
	$(ENV) GLOG_minloglevel=2 go run ./bench/compress -cnn

bench-serve: build
	$(ENV) go run ./bench/serve

# Throughput of 1 and 3 replicas behind nginx, each in its own network
# namespace (needs root and iproute2).
bench-cluster: build
	$(ENV) go run ./bench/cluster -kiln bin/kiln

# What shadow traffic costs production's clients (issue 14).
bench-rollout: build
	$(ENV) go run ./bench/rollout -kiln bin/kiln

clean:
	rm -rf bin build python/kiln/_native/*.so
