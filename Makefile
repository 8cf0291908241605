# lxd-image-server: the two commands that matter are `make run` and `make test`.
# Both install what they need on a Debian 12 or 13 machine (as root, or with sudo).

PYTHON  ?= /usr/bin/python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST  := $(BIN)/pytest
RUN_DIR ?= $(CURDIR)/var

RUN_PACKAGES := nginx-light python3-venv openssl

.PHONY: help deps run-deps venv lint unit check integration compat test bench run clean

help:
	@echo "make run    - the whole server in the foreground on https://127.0.0.1:8443 ($(RUN_DIR))"
	@echo "make test   - install what is needed, lint, run every test"
	@echo "make check  - lint and the unit tests only: quick, and needs no root"
	@echo "make bench  - benchmarks (ratios against a baseline measured in the same run)"
	@echo "make deb    - the Debian package and a flat apt repository in dist/"
	@echo "make system-test SUITE=bookworm|trixie - install the .deb in a booted Debian 12 or 13"
	@echo "                   container and check it (make system-tests: both)"
	@echo "make image  - the all-in-one container image lxd-image-server:latest (podman or docker)"

# Debian packages and a running LXD daemon (idempotent, fast when already done).
deps:
	$(SUDO) bash tests/host-setup.sh

# What `make run` needs: nginx (any Debian flavour) and python3-venv.
run-deps:
	@missing=""; for p in $(RUN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -x /usr/sbin/nginx ]; then missing=$$(echo $$missing | sed 's/nginx-light//'); fi; \
	if [ -n "$$(echo $$missing)" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(BIN)/.stamp: setup.py requirements-dev.txt
	@[ -x $(PYTHON) ] && $(PYTHON) -c 'import ensurepip' 2>/dev/null || $(MAKE) run-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e . -r requirements-dev.txt
	touch $@

venv: $(BIN)/.stamp

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lxd_image_server tests bench
	$(PYTEST) -q -p no:cacheprovider tests/lint

unit: venv
	$(PYTEST) tests/unit

# The quick tier: lint and the unit tests. No root, no servers, no daemons: any user who can
# write this checkout (the first `make venv` needs PyPI).
check: lint unit

integration: deps venv
	$(PYTEST) tests/integration

# The unit tests again with Debian's own python3-click, python3-cryptography and python3-yaml.
compat: deps
	$(PYTHON) -m venv --system-site-packages .venv-debian
	.venv-debian/bin/pip install --quiet --no-deps -e . inotify_simple==1.3.5
	.venv-debian/bin/python -c 'import click, cryptography, yaml; print("debian libs: click", click.__version__, "cryptography", cryptography.__version__, "yaml", yaml.__version__)'
	.venv-debian/bin/python -m pytest -p no:cacheprovider -o addopts="-W error::DeprecationWarning" tests/unit tests/integration/test_watch.py tests/integration/test_init.py

test: deps venv lint unit integration compat system-tests container-test

bench: venv run-deps
	$(BIN)/python bench/bench_update.py
	$(BIN)/python bench/bench_watch.py
	$(BIN)/python bench/bench_upload.py
	$(BIN)/python bench/bench_scale.py
	$(BIN)/python bench/bench_import.py
	$(BIN)/python bench/bench_delta.py
	$(BIN)/python bench/bench_sync.py
	$(BIN)/python bench/bench_ops.py

# ALLOW_OVERWRITES, ALLOW_DELETES and DEBUG pass through from the environment.
# Under sudo, the server runs as the user who called sudo (the checkout, and var/ in it, are
# theirs: `run` started as root would refuse a tree below a directory another user may change).
# As root itself, the upload server and the watcher run as RUN_USER, a system user made once
# (nginx's master stays root's); RUN_ARGS="--user NAME" names another.
RUN_USER ?= lxd-image-server-run
# (SUDO is empty exactly when this runs as root)
AS_CALLER := $(if $(SUDO),,$(if $(SUDO_USER),runuser -u $(SUDO_USER) --))
AS_ROOT   := $(if $(SUDO)$(SUDO_USER)$(findstring --user,$(RUN_ARGS)),,1)
run: run-deps venv
	@if [ -n "$(AS_ROOT)" ] && ! id -u $(RUN_USER) >/dev/null 2>&1; then \
	  echo "making the system user $(RUN_USER), which the upload server and the watcher run as"; \
	  useradd --system --user-group --no-create-home --home-dir /nonexistent \
	    --shell /usr/sbin/nologin $(RUN_USER); \
	fi
	$(AS_CALLER) $(BIN)/lxd-image-server --state-dir $(RUN_DIR)/state run --root-dir $(RUN_DIR)/root $(if $(AS_ROOT),--user $(RUN_USER)) $(RUN_ARGS)

include packaging.mk
include container.mk

clean:
	rm -rf $(VENV) .venv-debian .venv-k8s build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
