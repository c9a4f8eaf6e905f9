# The two commands a newcomer needs: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all bench protos clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing pulls a multi-GB CUDA build (2.13.0 is the CPU wheel on this disk)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m node.cli dev-swarm --nodes 4 --demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not chaos" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

protos: $(STAMP)
	$(PY) scripts/regen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info
