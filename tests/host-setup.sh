#!/bin/bash
# Prepares a Debian 12 or 13 machine (as root) for tests/integration: the Debian packages the
# tests use, and a running LXD daemon with a `dir` storage pool. Idempotent and fast when warm.
#
# Incus does not run on this machine: the tests install Debian 13's Incus 6.0.4 and
# trixie-backports' Incus 7 in booted Debian 13 containers of their own
# (tests/integration/incus_guest.py; systemd-nspawn and debootstrap come from here). Only
# incus-extra is installed here, for bench/bench_import.py's incus-simplestreams: from
# bookworm-backports on Debian 12 (the source is added if missing), from main on Debian 13.
# These machines do not run systemd as PID 1, so the LXD daemon is started by hand, detached
# from this script, logging to /var/log/lxd-test.log.
#
#   bash tests/host-setup.sh                  # packages + daemon + storage pool
#   bash tests/host-setup.sh --restart-lxd    # stop the LXD daemon and start it again (the
#                                             # tests do this after installing their CA: it
#                                             # reads the system CA store once, at start)
#   bash tests/host-setup.sh --restart-all    # the same, for every daemon of this script
set -euo pipefail

LXD_LOG=/var/log/lxd-test.log
PACKAGES=(
    lxd nginx-light busybox-static squashfs-tools xz-utils qemu-utils xdelta3 debootstrap
    openssl ca-certificates curl python3-venv man-db chromium openssh-server rsync
    python3-click python3-cryptography python3-pytest python3-pytest-timeout
    python3-yaml python3-hypothesis systemd-container tcpdump
)
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

say() { echo "host-setup: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        installed "$p" || missing+=("$p")
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

# The URI of the mirror the host's apt uses for its own release (deb.debian.org if none).
host_mirror() {
    local uri
    # shellcheck disable=SC2016  # $(...) here is apt's format syntax, not the shell's
    uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk -v s="$CODENAME" '$2 == s { print $1; exit }')
    echo "${uri:-http://deb.debian.org/debian/}"
}

has_backports() {
    # shellcheck disable=SC2016
    apt-get indextargets --format '$(RELEASE)' 2>/dev/null | grep -qx "$CODENAME-backports"
}

install_incus_extra() {
    # incus-simplestreams, the baseline of bench/bench_import.py
    if installed incus-extra; then
        say "incus-extra: present"
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    local target=()
    if [ "$CODENAME" = bookworm ]; then
        # Debian 12 has Incus 6.0 only in bookworm-backports
        if ! has_backports; then
            local mirror
            mirror=$(host_mirror)
            say "adding bookworm-backports ($mirror)"
            printf '%s\n' "Types: deb" "URIs: $mirror" "Suites: bookworm-backports" \
                "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
                >/etc/apt/sources.list.d/bookworm-backports.sources
        fi
        target=(-t bookworm-backports)
    fi
    say "installing incus-extra ${target[*]+"${target[*]}"}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${target[@]+"${target[@]}"}" incus-extra
}

# -- the LXD daemon ----------------------------------------------------------------------------

lxd_up() { lxc info >/dev/null 2>&1; }

# Closes every descriptor above 2 of the calling (sub)shell.
close_inherited() {
    local fd
    for fd in $(ls "/proc/$BASHPID/fd"); do
        if [ "$fd" -gt 2 ]; then
            eval "exec $fd>&-" 2>/dev/null || true
        fi
    done
}

start_lxd() {
    if lxd_up; then
        say "lxd daemon: already running"
        return
    fi
    local binary
    binary=$(command -v lxd) || die "no lxd daemon binary: is the package installed?"
    say "starting the lxd daemon (log: $LXD_LOG)"
    # setsid + nohup and no inherited descriptors: the daemon outlives this script, whoever
    # runs it never waits on its output, and it keeps no lock open (run under
    # `flock /tmp/lxd-heavy.lock`, a daemon that inherited the lock's descriptor held it for
    # as long as it ran)
    (
        close_inherited
        exec setsid nohup "$binary" --group root --logfile "$LXD_LOG" \
            </dev/null >>"$LXD_LOG" 2>&1
    ) &
    lxd waitready --timeout 60 || die "lxd did not become ready; see $LXD_LOG"
    lxd_up || die "lxd is up but 'lxc info' fails; see $LXD_LOG"
}

stop_lxd() {
    lxd_up || return 0
    say "stopping the lxd daemon"
    lxd shutdown --timeout 60 || die "'lxd shutdown' failed; see $LXD_LOG"
    local i
    for i in $(seq 1 120); do
        lxd_up || return 0
        sleep 0.5
    done
    die "lxd still answers after shutdown"
}

ensure_storage() {
    if [ -n "$(lxc storage list --format csv)" ]; then
        say "lxd storage: present"
        return
    fi
    # `init --auto` would try to create a bridge and fails to find a free subnet here:
    # a dir pool and a default profile with only a root disk are all the tests need
    say "lxd storage: creating the 'default' dir pool"
    lxd init --preseed <<'EOF'
storage_pools:
- name: default
  driver: dir
profiles:
- name: default
  description: Default profile
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
        install_incus_extra
        start_lxd
        ensure_storage
        ;;
    --restart-lxd | --restart-all)
        stop_lxd
        start_lxd
        ;;
    *)
        die "unknown argument: $1 (expected nothing, --restart-lxd, --restart-all)"
        ;;
esac
say "ready"
