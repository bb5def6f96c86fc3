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

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/taperfx demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) out
