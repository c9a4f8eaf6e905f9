# The two commands a newcomer needs: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test chaos test-all bench bench-netns protos clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing pulls a multi-GB CUDA build (2.13.0 is the CPU wheel on this disk)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# 4 local nodes, each with its own non-IID slice of scikit-learn's digits; a federated job with 1% top-k
# updates; a node is SIGKILLed mid-job and a fresh one joins; prints progress and where the final model is.
demo: $(STAMP)
	rm -rf demo-out
	$(PY) -m node.cli dev-swarm --nodes 4 --dataset digits --job examples/demo.toml --churn --demo --dir demo-out

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not chaos and not netns" -q --durations=25

# 8 real nodes under a seeded kill/restart/freeze/network-cut schedule, conservation under freezes, pipeline
# replicas killed mid-step, and the simulator's round time against real nodes in network namespaces (root) (~15 min)
chaos: $(STAMP)
	$(PY) -m pytest -m "chaos or netns" -q -s

test-all: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks print figures (recorded in README.md); they are never part of `make test`.
bench: $(STAMP)
	$(PY) scripts/bench_join.py --trials 5
	$(PY) scripts/bench_sparsifier.py
	$(PY) scripts/bench_allreduce.py --rounds 9
	$(PY) scripts/bench_allreduce.py --rounds 9 --mode approx --result-density 0.01
	$(PY) scripts/bench_convergence.py
	$(PY) scripts/bench_convergence.py --result-density 0.01

# Needs root (ip netns, tc): 4 peers in network namespaces, egress capped at 100 Mbit/s
bench-netns: $(STAMP)
	$(PY) scripts/bench_allreduce.py --netns --rate-mbit 100 --rounds 5
	$(PY) scripts/bench_allreduce.py --netns --rate-mbit 100 --rounds 5 --mode approx --result-density 0.01

protos: $(STAMP)
	$(PY) scripts/regen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info
