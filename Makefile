# The two commands a newcomer needs: `make demo` and `make test`. Each builds .venv on first use, from the lock.
#
# Installs are pinned: requirements.lock holds every dependency, direct and transitive, at an exact version
# (generated from pyproject.toml's ranges by pip-tools' pip-compile: `make lock`). .venv is built from nothing
# whenever the lock changes, so it holds exactly what the lock says; `pip check` proves the set is complete.
# `make test-latest` tries the newest versions pyproject.toml's ranges allow in a throwaway venv and prints
# how they differ from the lock; refresh the lock (`make lock`, then `make test`) when test-latest is green.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
VENV_STAMP := $(VENV)/.lock-stamp
STAMP := $(VENV)/.project-stamp
LATEST := .venv-latest
FAST := -m "not slow and not chaos and not netns"

.PHONY: demo test lint test-latest lock chaos test-all bench bench-netns protos clean

# The venv from nothing, then every pinned package without resolving anything (--no-deps): torch==2.13.0+cpu
# is the CPU wheel pip finds on this machine's disk (elsewhere: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
$(VENV_STAMP): $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	touch $(VENV_STAMP)

# The project itself (editable), built with the locked setuptools rather than whatever is newest.
$(STAMP): $(VENV_STAMP) pyproject.toml
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# 4 local nodes, each with its own non-IID slice of scikit-learn's digits; a federated job with 1% top-k
# updates; a node is SIGKILLed mid-job and a fresh one joins; prints progress and where the final model is.
demo: $(STAMP)
	rm -rf demo-out
	$(PY) -m node.cli dev-swarm --nodes 4 --dataset digits --job examples/demo.toml --churn --demo --dir demo-out

test: $(STAMP)
	$(PY) -m pytest $(FAST) -q --durations=25

# ruff (style, imports, likely bugs) and mypy (types), both configured in pyproject.toml; CI runs it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Regenerate the lock from pyproject.toml with today's newest versions its ranges allow (then run make test).
lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --extra dev --allow-unsafe --strip-extras --no-emit-index-url \
	    --no-emit-find-links --no-emit-trusted-host --upgrade -o $(LOCK) pyproject.toml

# Drift is found by us, not by users: the newest versions the ranges allow, in a throwaway venv, then the fast
# suite. Prints every package whose version differs from the lock.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -m pip install -q -e '.[dev]'
	$(LATEST)/bin/python scripts/lock_drift.py $(LOCK)
	SWARMNODE_TEST_LATEST=1 $(LATEST)/bin/python -m pytest $(FAST) -q -p no:cacheprovider; status=$$?; \
	    rm -rf $(LATEST); exit $$status

# 8 real nodes under a seeded kill/restart/freeze/network-cut schedule, conservation under freezes, pipeline
# replicas killed mid-step, the simulator's round time against real nodes in network namespaces (root), and the
# other long real-process tests (marked slow: the LoRA fine-tune of a model folder) (~16 min)
chaos: $(STAMP)
	$(PY) -m pytest -m "chaos or netns or slow" -q -s

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
	rm -rf $(VENV) $(LATEST) build *.egg-info
