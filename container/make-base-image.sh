#!/bin/sh
# Makes the base image the Containerfile starts from, docker.io/library/debian:12-slim, on a
# machine that cannot reach a registry: debootstrap --variant=minbase, trimmed like Debian's
# slim images, then `podman import` (or `docker import`) under that name.
#
# Does nothing when the image is already in local storage (pulled, or made earlier). The
# debootstrapped tree is cached as a tarball outside the repository, so a later run (or another
# machine user) only imports it again: CACHE_DIR/debian-12-minbase.tar.
#
# Environment: ENGINE (podman or docker; default: whichever is installed, podman first),
# ENGINE_OPTS (global options of the engine), CACHE_DIR, DEBIAN_MIRROR, DEBIAN_SECURITY.
set -eu

NAME=docker.io/library/debian:12-slim
CACHE_DIR=${CACHE_DIR:-/var/cache/lxd-image-server-test/container}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
ENGINE=${ENGINE:-$(command -v podman || command -v docker || true)}
ENGINE_OPTS=${ENGINE_OPTS:-}
TARBALL=$CACHE_DIR/debian-12-minbase.tar

if [ -z "$ENGINE" ]; then
    echo "make-base-image: neither podman nor docker is installed" >&2
    exit 1
fi
# shellcheck disable=SC2086
if $ENGINE $ENGINE_OPTS image inspect "$NAME" >/dev/null 2>&1; then
    echo "make-base-image: $NAME is present"
    exit 0
fi

if [ ! -f "$TARBALL" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "make-base-image: debootstrap needs root" >&2
        exit 1
    fi
    command -v debootstrap >/dev/null || {
        echo "make-base-image: debootstrap is missing (apt-get install debootstrap)" >&2
        exit 1
    }
    mkdir -p "$CACHE_DIR"
    tree=$CACHE_DIR/rootfs.tmp
    rm -rf "$tree"
    echo "make-base-image: debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR"
    debootstrap --variant=minbase bookworm "$tree" "$DEBIAN_MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 || {
        tail -n 30 "$CACHE_DIR/debootstrap.log" >&2
        exit 1
    }
    # what Debian's slim images do: no documentation, manuals or locales from later installs,
    # apt's downloads deleted after each install, and the deb822 sources
    cat >"$tree/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CONF
    cat >"$tree/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
    rm -f "$tree/etc/apt/sources.list"
    cat >"$tree/etc/apt/sources.list.d/debian.sources" <<CONF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
CONF
    rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/archives/*.deb \
        "$tree"/var/log/*.log "$tree"/var/log/apt/* "$tree"/usr/share/doc/* \
        "$tree"/usr/share/man/* "$tree"/usr/share/info/*
    : >"$tree/etc/hostname"
    : >"$tree/etc/resolv.conf"
    tar --numeric-owner --xattrs -C "$tree" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$tree"
fi

echo "make-base-image: importing $TARBALL as $NAME"
# shellcheck disable=SC2086
$ENGINE $ENGINE_OPTS import --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$TARBALL" "$NAME" >/dev/null
echo "make-base-image: $NAME imported"
