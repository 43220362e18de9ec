# Moorage: the two commands a new machine needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= ./moorage-data
LISTEN ?= 127.0.0.1:5000
PYTEST_ARGS ?=
# Test modules run this many at a time (pytest-xdist, one module per process, so
# a module's fixtures start once); TEST_PROCESSES=0 runs them one after another.
TEST_PROCESSES ?= 2
BENCH_ARGS ?=

RUN_DEPS := etcd-server:etcd etcd-client:etcdctl
TEST_DEPS := skopeo:skopeo haproxy:haproxy docker.io:dockerd chromium:chromium npm:npm iproute2:ip iptables:iptables faketime:faketime prometheus:promtool
BENCH_DEPS := docker-registry:docker-registry wrk:wrk curl:curl hey:hey

.PHONY: install run test bench bench-s3 bench-console bench-cluster bench-gc bench-s3-clients clean

## install: set up everything `run` and `test` need (virtualenv, Python, Debian and npm packages)
install: $(VENV)/.installed node_modules/.installed
	@scripts/system-deps.sh $(RUN_DEPS) $(TEST_DEPS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# Test tools from npm (axe-core for the console's browser tests), exactly as package-lock.json pins them.
node_modules/.installed: package.json package-lock.json
	@scripts/system-deps.sh npm:npm
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

## run: start a registry on 127.0.0.1:5000 with its data in ./moorage-data
run: install
	$(BIN)/moorage serve --data-dir $(DATA_DIR) --listen $(LISTEN)

## test: the layers' import contracts (pyproject.toml), then the whole suite against a real etcd and real clients
test: install
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

## bench: Moorage against the reference registry (Debian docker-registry), same workload, alternating; then the console
## (BENCH_ARGS=--s3: both on S3 buckets of a SeaweedFS the bench starts, with the S3 rows; no console run)
bench: install
	@scripts/system-deps.sh $(BENCH_DEPS)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)
	$(if $(filter --s3,$(BENCH_ARGS)),,$(BIN)/python bench/console_bench.py $(filter --quick --insecure-http,$(BENCH_ARGS)))

## bench-s3: the same on S3 (make bench BENCH_ARGS=--s3): pulls against direct reads, GC of 100,000 blobs
bench-s3: install
	@$(MAKE) --no-print-directory bench BENCH_ARGS="--s3 $(BENCH_ARGS)"

## bench-console: the web console's server time at 10,000 repositories and 10,000 tags
bench-console: install
	$(BIN)/python bench/console_bench.py $(BENCH_ARGS)

## bench-cluster: push and pull through HAProxy over 3 replicas against 1, and failover
bench-cluster: install
	@scripts/system-deps.sh $(BENCH_DEPS) haproxy:haproxy
	$(BIN)/python bench/cluster_bench.py $(BENCH_ARGS)

## bench-gc: garbage collection time and memory for 100,000 blobs and 10,000 manifests
bench-gc: install
	$(BIN)/python bench/gc_bench.py $(BENCH_ARGS)

## bench-s3-clients: obstore against aiobotocore on a real SeaweedFS (the S3 driver's client, chosen by it)
bench-s3-clients: install
	$(BIN)/pip install -q -e '.[test,bench-s3]'
	$(BIN)/python bench/s3_clients.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info node_modules
