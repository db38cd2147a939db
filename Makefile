# Two commands set everything up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?=

.PHONY: run test lint audit bench bench-quick clean

# setuptools is upgraded too: the one `venv` seeds on 3.11 (65.5) has known vulnerabilities.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/secret-sidecar run $(if $(CONFIG),-c $(CONFIG))

lint: $(BIN)/.installed
	$(BIN)/ruff check sidecar tests bench tools
	$(BIN)/ruff format --check sidecar tests bench tools
	$(BIN)/mypy

# Known vulnerabilities in the venv's packages, from PyPI's advisories (tools/audit.py);
# allowlist: audit-allowlist.txt. Packages it cannot check are listed (fail with --strict).
audit: $(BIN)/.installed
	$(BIN)/python tools/audit.py

test: lint audit
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered

# Cached reads over the socket, side by side with the floor server (bench/http.py); needs
# h2load (Debian: nghttp2-client). bench writes bench/results/<date>.{json,md,png}; bench-quick
# (CI) reports one short run and asserts nothing.
bench: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet matplotlib
	$(BIN)/python -m bench.http --save

bench-quick: $(BIN)/.installed
	$(BIN)/python -m bench.http --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage* sidecar.sock
