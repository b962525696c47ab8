# Two commands on a fresh machine: `make run` (the main job on the built-in toy world) and `make test`.
# Both create .venv when missing: torch first, pinned to the CPU wheel, then the project and its test
# extras installed so that they keep that torch.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
# Where the CPU wheel comes from: these machines' pip finds it locally; elsewhere pass
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
STAMP   := $(VENV)/.installed

.PHONY: run test test-all bench bench-setup venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) $(TORCH)
	$(BIN)/python -W ignore -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(BIN)/python -m pip install --quiet -e ".[test]" $(TORCH)
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/llama2 pipeline --out runs/toy

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_inference.py --threads 2

# llama.cpp (llama-cpp-python, compiled here: about 4-8 minutes) for the inference benchmark; never part of make test
bench-setup: $(STAMP)
	bash benchmarks/setup_llamacpp.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
