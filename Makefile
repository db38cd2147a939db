# Two commands set everything up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS := .tools/bin
CONFIG ?=
LOCK := uv pip compile --quiet --no-header --generate-hashes --python-version 3.11

.PHONY: run test lint audit bench bench-quick lock tools wheelhouse image image-test clean

# Dependencies come from the hash-pinned lock (requirements/dev.txt: [all] and [test]),
# then the project itself without resolving anything again. setuptools is upgraded first:
# the one `venv` seeds on 3.11 (65.5) has known vulnerabilities.
$(BIN)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The deploy tests' programs (requirements/tools.txt) live in their own venv: they are
# large and none of them is a dependency of the daemon.
$(TOOLS)/.installed: requirements/tools.txt
	$(PYTHON) -m venv .tools
	$(TOOLS)/python -m pip install --quiet --require-hashes -r requirements/tools.txt
	touch $@

tools: $(TOOLS)/.installed

# Refresh the lock files after changing dependencies in pyproject.toml or tools.in.
# runtime.txt is what the image installs; dev.txt adds [test] within runtime.txt's pins.
lock: $(TOOLS)/.installed
	$(TOOLS)/$(LOCK) --universal --extra all pyproject.toml -o requirements/runtime.txt
	$(TOOLS)/$(LOCK) --universal --extra all --extra test -c requirements/runtime.txt \
		pyproject.toml -o requirements/dev.txt
	$(TOOLS)/$(LOCK) requirements/tools.in -o requirements/tools.txt

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

test: lint audit $(TOOLS)/.installed
	$(BIN)/pytest -n 2 --cov --cov-report=term-missing:skip-covered

# The image's wheelhouse (see Dockerfile): the lock's wheels for linux x86_64 CPython 3.11
# and the project's own wheel, so the image builds without an index. Downloads already
# there are kept; the project's wheel is built again each time.
WHEELS := build/wheels
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker
# python:3.11-slim is Debian bookworm (glibc 2.36); pip matches these tags literally.
PLATFORMS := manylinux2014 manylinux_2_17 manylinux_2_28 manylinux_2_34 manylinux_2_36

wheelhouse: $(BIN)/.installed
	$(BIN)/python -m pip download --quiet --require-hashes --no-deps --only-binary=:all: \
		$(PLATFORMS:%=--platform %_x86_64) --python-version 3.11 --implementation cp --abi cp311 \
		-r requirements/runtime.txt -d $(WHEELS)
	rm -f $(WHEELS)/secret_sidecar-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELS) .

# DOCKER=podman works too (buildah: `buildah bud --format docker`, or HEALTHCHECK is lost).
image: wheelhouse
	$(DOCKER) build --build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD) \
		-t secret-sidecar:$(VERSION) .

# Builds the image with buildah (no Docker daemon needed) against a stand-in base and runs
# it: --version, a secret over the socket, as uid 10001 on a read-only root. Needs root;
# installs buildah and debootstrap itself (apt) and caches the base.
image-test: wheelhouse
	tools/image_test.sh

# Cached reads over the socket, side by side with the floor server (bench/http.py); needs
# h2load (Debian: nghttp2-client). bench writes bench/results/<date>.{json,md,png}; bench-quick
# (CI) reports one short run and asserts nothing.
bench: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet matplotlib
	$(BIN)/python -m bench.http --save

bench-quick: $(BIN)/.installed
	$(BIN)/python -m bench.http --quick

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache .coverage* sidecar.sock
