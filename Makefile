# Two entry points for a fresh machine; each builds its own .venv first.
#   make demo   lower DeepSeek-V3 MLA, verify it against the plain definition, write dumps
#   make test   the test suite (also installs vLLM 0.30.0 and the browser/graphviz the tests use)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test clean system-deps

# mla-graph itself: torch 2.13.0 (CPU build) and networkx.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# Test environment: vLLM 0.30.0 (pins torch 2.13.0) for the plugin tests. Its wheel brings
# CUDA-built torchvision/torchaudio/torchcodec that fail to import beside a CPU torch
# ("operator torchvision::nms does not exist") and break `import vllm`; nothing here needs them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet vllm==0.30.0
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

# Headless Chromium (the HTML report's browser test) and Graphviz (SVG drawings), from Debian.
system-deps:
	@command -v chromium >/dev/null && command -v dot >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium graphviz >/dev/null)

demo: $(STAMP)
	$(BIN)/mla-graph lower --preset deepseek-v3 --target npu --phase all --dump dumps/deepseek-v3 --verify

test: $(TEST_STAMP) system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) dumps
