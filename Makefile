# The two commands a newcomer runs: `make quickstart` and `make test`.
# Each creates .venv on first use and installs the pinned dependencies
# (the CPU build torch==2.13.0 on machines without an NVIDIA driver).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: quickstart test lint clean

$(VENV)/.installed: requirements-ci.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch>=2.6"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m velotune quickstart

test: $(VENV)/.installed
	# One BLAS thread per xdist worker: two workers on two cores would otherwise oversubscribe.
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS) tests

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff==0.14.6 && $(PY) -m ruff check velotune tests benchmarks

clean:
	rm -rf $(VENV) quickstart_out
