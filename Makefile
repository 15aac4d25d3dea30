# Two entry points for a fresh machine; each builds its own .venv first.
#   make demo   lower DeepSeek-V3 MLA, verify it against the plain definition, write dumps
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mla-graph lower --preset deepseek-v3 --target npu --phase all --dump dumps/deepseek-v3 --verify

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) dumps
