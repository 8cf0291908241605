#!/bin/bash
# Prepares a Debian 12 machine (as root) for tests/integration: the Debian packages the tests
# use, and a running LXD daemon with a `dir` storage pool. Idempotent and fast when warm.
#
# These machines do not run systemd as PID 1, so the LXD daemon is started by hand, detached
# from this script, logging to /var/log/lxd-test.log.
#
#   bash tests/host-setup.sh                # packages + daemon + storage pool
#   bash tests/host-setup.sh --restart-lxd  # stop the daemon and start it again (the tests do
#                                           # this after installing their CA: LXD reads the
#                                           # system CA store once, at start)
set -euo pipefail

LXD_LOG=/var/log/lxd-test.log
PACKAGES=(
    lxd nginx-light busybox-static squashfs-tools xz-utils qemu-utils
    openssl ca-certificates curl python3-venv man-db chromium openssh-server rsync
    python3-click python3-openssl python3-cryptography python3-pytest python3-pytest-timeout
)

say() { echo "host-setup: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

install_packages() {
    local missing=() p status
    for p in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [ "$status" = "install ok installed" ] || missing+=("$p")
    done
    # nginx (full) provides the same binary as nginx-light: either will do
    if [ ${#missing[@]} -gt 0 ] && [[ " ${missing[*]} " == *" nginx-light "* ]] \
        && [ -x /usr/sbin/nginx ]; then
        local rest=()
        for p in "${missing[@]}"; do [ "$p" = nginx-light ] || rest+=("$p"); done
        missing=("${rest[@]+"${rest[@]}"}")
    fi
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages: all present"
        return
    fi
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

lxd_up() { lxc info >/dev/null 2>&1; }

start_lxd() {
    if lxd_up; then
        say "LXD daemon: already running"
        return
    fi
    say "starting the LXD daemon (log: $LXD_LOG)"
    # setsid + nohup and no inherited descriptors: the daemon outlives this script and
    # whoever runs it never waits on its output
    setsid nohup lxd --group root --logfile "$LXD_LOG" </dev/null >>"$LXD_LOG" 2>&1 &
    lxd waitready --timeout 60 || die "LXD did not become ready; see $LXD_LOG"
    lxd_up || die "LXD is up but 'lxc info' fails; see $LXD_LOG"
}

stop_lxd() {
    lxd_up || return 0
    say "stopping the LXD daemon"
    lxd shutdown --timeout 60 || die "'lxd shutdown' failed; see $LXD_LOG"
    local i
    for i in $(seq 1 120); do
        lxd_up || return 0
        sleep 0.5
    done
    die "LXD still answers after 'lxd shutdown'"
}

ensure_storage() {
    if [ -n "$(lxc storage list --format csv)" ]; then
        say "LXD storage: present"
        return
    fi
    # `lxd init --auto` would try to create a bridge and fails to find a free subnet here:
    # a dir pool and a default profile with only a root disk are all the tests need
    say "LXD storage: creating the 'default' dir pool"
    lxd init --preseed <<'EOF'
storage_pools:
- name: default
  driver: dir
profiles:
- name: default
  description: Default LXD profile
  devices:
    root:
      path: /
      pool: default
      type: disk
EOF
}

case "${1:-}" in
    "")
        install_packages
        start_lxd
        ensure_storage
        ;;
    --restart-lxd)
        stop_lxd
        start_lxd
        ;;
    *)
        die "unknown argument: $1 (expected nothing or --restart-lxd)"
        ;;
esac
say "ready"
