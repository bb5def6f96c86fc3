# Two entry points: `make demo` (the whole product on the embedded corpus) and
# `make test` (the whole suite). Both create or reuse .venv and install what they need.
#
# CPU build of torch by default. For a CUDA build:
#   make TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
OUT ?= out/demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taperfx-installed

.PHONY: demo test test-fast test-thorough lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/taperfx demo --out $(OUT)

# The whole suite, lint first: what CI runs.
test: lint
	$(PY) -m pytest -n 2 -q tests

# The inner loop: everything not marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" tests

# The whole suite with many more generated examples (the fold grammar's thorough profile; 500 per property).
test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough TAPERFX_HYPOTHESIS_EXAMPLES=500 $(PY) -m pytest -n 2 -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) out
