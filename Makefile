# lxd-image-server: the two commands that matter are `make run` and `make test`.
# Both install what they need on a Debian 12 machine (as root, or with sudo).

PYTHON  ?= /usr/bin/python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST  := $(BIN)/pytest
RUN_DIR ?= $(CURDIR)/var

.PHONY: help deps venv lint unit integration compat test bench run clean

help:
	@echo "make run    - serve a local tree ($(RUN_DIR)) and republish it on every change"
	@echo "make test   - install what is needed, lint, run every test"
	@echo "make bench  - benchmarks (ratios against a baseline measured in the same run)"

# Debian packages and a running LXD daemon (idempotent, fast when already done).
deps:
	$(SUDO) bash tests/host-setup.sh

$(BIN)/.stamp: setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e . -r requirements-dev.txt
	touch $@

venv: $(BIN)/.stamp

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lxd_image_server

unit: venv
	$(PYTEST) tests/unit

integration: deps venv
	$(PYTEST) tests/integration

# The unit tests again with Debian 12's own python3-click, python3-openssl and cryptography.
compat: deps
	$(PYTHON) -m venv --system-site-packages .venv-debian
	.venv-debian/bin/pip install --quiet --no-deps -e . inotify_simple==2.0.1
	.venv-debian/bin/python -c 'import click, OpenSSL; print("debian libs: click", click.__version__, "pyOpenSSL", OpenSSL.__version__)'
	.venv-debian/bin/python -m pytest -p no:cacheprovider -o addopts="-W error::DeprecationWarning" tests/unit

test: deps venv lint unit integration compat

bench: venv
	$(BIN)/python bench/bench_update.py
	$(BIN)/python bench/bench_watch.py

run: venv
	mkdir -p $(RUN_DIR)/root/images $(RUN_DIR)/state
	$(BIN)/lxd-image-server --state-dir $(RUN_DIR)/state watch --root-dir $(RUN_DIR)/root

clean:
	rm -rf $(VENV) .venv-debian build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
