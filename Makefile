# svd-serve: `make demo` and `make test` are the two commands a newcomer needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch for development and CI; the GPU image installs a CUDA build instead.
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo lint test test-fast clean

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev]'
	# The Python client is its own distribution (no torch/Ray/diffusers); the CLI and tests use it.
	$(PIP) install -q -e clients/python
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/svd-serve demo --out demo-output

lint: venv
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not e2e"

clean:
	rm -rf .svd-serve demo-output .pytest_cache
