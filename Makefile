# Two entry points do all set-up on a fresh Debian machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/cube serve

lint: $(STAMP)
	$(BIN)/ruff check actors supervisors cube guest tests benchmarks
	$(BIN)/mypy actors supervisors guest cube/store

unit: $(STAMP)
	$(BIN)/pytest

test: lint unit

bench: $(STAMP)
	$(BIN)/python benchmarks/actors.py

clean:
	rm -rf $(VENV)
