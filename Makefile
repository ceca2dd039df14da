# Two entry points on a fresh Debian machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test deps system-deps clean

system-deps:
	@bash scripts/system-deps.sh

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

deps: system-deps $(STAMP)

run: deps
	$(BIN)/coupon-engine serve

test: deps
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) var
