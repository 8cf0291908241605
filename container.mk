# The all-in-one container image, the Kubernetes example and their test (included by the
# Makefile, next to packaging.mk, whose `deb` target writes dist/apt).
#
#   make image           lxd-image-server:latest from our .deb (runs `make deb` first)
#   make container-test  builds the image, runs it in both modes (real uploads, real LXD
#                        launches, restart, health check) and validates kubernetes/ against
#                        the Kubernetes schemas; see tests/container/
#
# Podman is preferred, then docker. Without systemd (these machines and CI), podman runs with
# runc and cgroupfs, builds with chroot isolation, and every run and build gets explicit ulimits
# no higher than the host's hard limits. The base image docker.io/library/debian:12-slim is made
# locally with debootstrap when it is not in local storage (no registry needed); its tarball is
# cached in CONTAINER_CACHE.

CONTAINER_MK      := $(lastword $(MAKEFILE_LIST))
CONTAINER_SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONTAINER_ENGINE  ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
IMAGE             ?= lxd-image-server:latest
IMAGE_CONTEXT     := build/container-context
CONTAINER_CACHE   ?= /var/cache/lxd-image-server-test/container
CONTAINER_PKGS    := podman runc debootstrap nginx-light curl
K8S_VENV          := .venv-k8s
K8S_PYTHON        ?= /usr/bin/python3
KUBERNETES_VALIDATE := kubernetes-validate==1.37.0

ifeq ($(notdir $(CONTAINER_ENGINE)),podman)
ifeq ($(wildcard /run/systemd/system),)
ENGINE_OPTS ?= --runtime runc --cgroup-manager=cgroupfs
BUILD_OPTS  ?= --isolation chroot
endif
# the OCI format has no HEALTHCHECK
BUILD_OPTS  += --format docker
endif
# The engine's defaults can exceed the host's hard limits, which runc then refuses to set;
# podman itself runs builds with at most 32768 processes.
BUILD_ULIMITS ?= $(shell bash -c 'n=$$(ulimit -Hn); p=$$(ulimit -Hu); \
    [ "$$n" = unlimited ] && n=1048576; [ "$$p" = unlimited ] || [ "$$p" -gt 32768 ] && p=32768; \
    echo "--ulimit nofile=$$n:$$n --ulimit nproc=$$p:$$p"')

.PHONY: image image-build container-deps k8s-venv container-test

container-deps:
	@missing=""; for p in $(CONTAINER_PKGS); do \
	    [ "$$(dpkg-query -W -f='$${Status}' $$p 2>/dev/null)" = "install ok installed" ] \
	        || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "container: installing$$missing"; \
	    $(CONTAINER_SUDO) apt-get update -q && \
	    $(CONTAINER_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	        -o DPkg::Lock::Timeout=600 --no-install-recommends $$missing; \
	else echo "container: host packages present"; fi

# The image from whatever dist/apt holds now (`image` makes it first).
image-build:
	@test -n "$(CONTAINER_ENGINE)" || { echo "install podman (or docker)"; exit 1; }
	@test -f dist/apt/Packages || { echo "dist/apt is missing: run make deb"; exit 1; }
	ENGINE="$(CONTAINER_ENGINE)" ENGINE_OPTS="$(ENGINE_OPTS)" CACHE_DIR="$(CONTAINER_CACHE)" \
	    sh container/make-base-image.sh
	rm -rf $(IMAGE_CONTEXT)
	mkdir -p $(IMAGE_CONTEXT)
	cp container/Containerfile $(IMAGE_CONTEXT)/Containerfile
	install -m 0755 container/entrypoint.sh $(IMAGE_CONTEXT)/entrypoint.sh
	@# the packages and their index; not Release, whose Date would defeat the layer cache
	mkdir -p $(IMAGE_CONTEXT)/apt
	cp -p dist/apt/*.deb dist/apt/Packages $(IMAGE_CONTEXT)/apt/
	old=$$($(CONTAINER_ENGINE) $(ENGINE_OPTS) image inspect --format '{{.Id}}' $(IMAGE) 2>/dev/null); \
	$(CONTAINER_ENGINE) $(ENGINE_OPTS) build $(strip $(BUILD_OPTS)) $(BUILD_ULIMITS) \
	    -t $(IMAGE) -f $(IMAGE_CONTEXT)/Containerfile $(IMAGE_CONTEXT) && \
	new=$$($(CONTAINER_ENGINE) $(ENGINE_OPTS) image inspect --format '{{.Id}}' $(IMAGE)) && \
	if [ -n "$$old" ] && [ "$$old" != "$$new" ]; then \
	    $(CONTAINER_ENGINE) $(ENGINE_OPTS) rmi "$$old" >/dev/null 2>&1 || true; fi

image: deb
	$(MAKE) -f $(CONTAINER_MK) image-build

$(K8S_VENV)/.stamp: $(CONTAINER_MK)
	rm -rf $(K8S_VENV)
	$(K8S_PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install --quiet $(KUBERNETES_VALIDATE)
	touch $@

k8s-venv: $(K8S_VENV)/.stamp

# `deps` and `venv` (LXD, the test tools, the project's venv) come from the Makefile; the test
# builds the image itself (make image-build) from the dist/apt that `deb` just wrote.
container-test: deps venv container-deps k8s-venv deb
	$(PYTEST) tests/container
