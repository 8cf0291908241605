# Debian packaging of lxd-image-server and its system test (included by the Makefile).
#
#   make deb          dist/lxd-image-server_<version>_all.deb, and dist/apt: a flat apt
#                     repository with it and python3-inotify-simple (built from PyPI with stdeb)
#   make lintian      lintian on the package: no errors, no warnings
#   make system-test  installs the package in a booted Debian container (systemd-nspawn) and
#                     checks it end to end, including real LXD launches; see tests/system/.
#                     SUITE=bookworm (Debian 12, the default) or SUITE=trixie (Debian 13)
#   make system-tests both suites, one after the other (what `make test` runs)
#
# Everything is built in build/ (ignored by git) from a copy of the sources, so the build never
# touches the working tree. Host packages are installed by `make deb-deps` (idempotent).

DEB_SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_VERSION     = $(shell dpkg-parsechangelog -l debian/changelog -S Version 2>/dev/null)
DEB_FILE        = lxd-image-server_$(DEB_VERSION)_all.deb
DIST            := dist
APT_REPO        := $(DIST)/apt
# Debian 12 packages neither inotify_simple nor a newer setuptools: 1.3.5 is the last release
# whose sdist has a setup.py, which stdeb needs (2.x builds with pyproject.toml only).
INOTIFY_VERSION := 1.3.5
INOTIFY_BUILD   := build/inotify-simple
INOTIFY_SDIST   := $(INOTIFY_BUILD)/inotify_simple-$(INOTIFY_VERSION).tar.gz
INOTIFY_DEB     := $(APT_REPO)/python3-inotify-simple_$(INOTIFY_VERSION)-1_all.deb
DEB_MAINTAINER  := $(shell sed -n 's/^Maintainer: //p' debian/control)
# Debian's tools only: no pyenv or venv python in front of /usr/bin/python3
DEB_ENV         := env -u PYTHONPATH -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
DEB_SOURCES     := setup.py setup.cfg README.md lxd_image_server nginx systemd sshd man debian etc
DEB_HOST_PKGS   := dpkg-dev debhelper dh-python python3-all python3-setuptools python3-stdeb \
                   python3-pip apt-utils lintian debootstrap systemd-container \
                   openssh-client curl busybox-static squashfs-tools xz-utils

# the Debian release the system test boots (tests/system/container.py reads it)
SUITE           ?= bookworm
SYSTEM_SUITES   := bookworm trixie

.PHONY: deb deb-deps lintian system-test system-tests

deb-deps:
	@missing=""; for p in $(DEB_HOST_PKGS); do \
	    [ "$$(dpkg-query -W -f='$${Status}' $$p 2>/dev/null)" = "install ok installed" ] \
	        || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "packaging: installing$$missing"; \
	    $(DEB_SUDO) apt-get update -q && \
	    $(DEB_SUDO) env DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -q --no-install-recommends $$missing; \
	else echo "packaging: host packages present"; fi

$(INOTIFY_SDIST): | deb-deps
	mkdir -p $(INOTIFY_BUILD)
	$(DEB_ENV) python3 -m pip download --quiet --no-deps --no-binary :all: \
	    --dest $(INOTIFY_BUILD) inotify_simple==$(INOTIFY_VERSION)

$(INOTIFY_DEB): $(INOTIFY_SDIST) | deb-deps
	rm -rf $(INOTIFY_BUILD)/deb_dist
	cd $(INOTIFY_BUILD) && $(DEB_ENV) py2dsc --with-python2=False --with-python3=True \
	    --maintainer "$(DEB_MAINTAINER)" inotify_simple-$(INOTIFY_VERSION).tar.gz
	cd $(INOTIFY_BUILD)/deb_dist/inotify-simple-$(INOTIFY_VERSION) && \
	    $(DEB_ENV) dpkg-buildpackage -b -us -uc
	mkdir -p $(APT_REPO)
	cp $(INOTIFY_BUILD)/deb_dist/$(notdir $(INOTIFY_DEB)) $@.tmp
	mv $@.tmp $@

# Each build gets its own directory and replaces the files in dist/ by renames, so two builds
# at once (other make targets use dist/apt too) never leave a torn file behind.
deb: deb-deps $(INOTIFY_DEB)
	@test -n "$(DEB_VERSION)" || { echo "no version in debian/changelog"; exit 1; }
	@set -e; mkdir -p build; work=$$(mktemp -d $(CURDIR)/build/deb.XXXXXX); \
	mkdir $$work/src; \
	tar -c --exclude=__pycache__ --exclude='*.egg-info' $(DEB_SOURCES) | tar -x -C $$work/src; \
	echo "packaging: dpkg-buildpackage in $$work/src"; \
	(cd $$work/src && $(DEB_ENV) dpkg-buildpackage -b -us -uc) > $$work/build.log 2>&1 \
	    || { tail -40 $$work/build.log; echo "packaging: build failed, see $$work"; exit 1; }; \
	for d in $(DIST) $(APT_REPO); do \
	    cp $$work/$(DEB_FILE) $$d/.$(DEB_FILE).tmp && mv $$d/.$(DEB_FILE).tmp $$d/$(DEB_FILE); \
	    find $$d -maxdepth 1 -name 'lxd-image-server_*_all.deb' ! -name '$(DEB_FILE)' -delete; \
	done; \
	cd $(APT_REPO); \
	dpkg-scanpackages --multiversion . /dev/null 2>/dev/null > .Packages.tmp; \
	gzip -9nc .Packages.tmp > .Packages.gz.tmp; \
	mv .Packages.tmp Packages; mv .Packages.gz.tmp Packages.gz; \
	rm -rf .release; mkdir .release; cp Packages Packages.gz .release/; \
	(cd .release && apt-ftparchive release .) > .Release.tmp; \
	rm -rf .release; mv .Release.tmp Release; \
	rm -rf $$work
	@echo "packaging: $(DIST)/$(DEB_FILE) and the apt repository $(APT_REPO)"

lintian: deb
	lintian --fail-on error,warning --display-info $(DIST)/$(DEB_FILE)

# Needs root; `deps` (tests/host-setup.sh: LXD, busybox, squashfs-tools) and `venv` come from
# the Makefile. Takes a few minutes on a warm cache (/var/cache/lxd-image-server-test).
# One package for every suite: the same .deb installs on Debian 12 and 13.
system-test: deps venv deb
	LXD_IMAGE_SERVER_TEST_SUITE=$(SUITE) $(PYTEST) -v --durations=0 tests/system

system-tests: deps venv deb
	@set -e; for s in $(SYSTEM_SUITES); do \
	    echo "system test: Debian $$s"; \
	    LXD_IMAGE_SERVER_TEST_SUITE=$$s $(PYTEST) -v --durations=0 tests/system; \
	done
