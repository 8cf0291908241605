#!/bin/bash
# Prepares a Debian 12 or 13 machine (as root) for tests/integration: the Debian packages the
# tests use, and running LXD and Incus daemons, each with a `dir` storage pool. Idempotent and
# fast when warm.
#
# Incus comes from bookworm-backports on Debian 12 (the source is added if missing) and from
# main on Debian 13. These machines do not run systemd as PID 1, so both daemons are started by
# hand, detached from this script, logging to /var/log/lxd-test.log and /var/log/incus-test.log.
#
#   bash tests/host-setup.sh                  # packages + daemons + storage pools
#   bash tests/host-setup.sh --restart-lxd    # stop the LXD daemon and start it again
#   bash tests/host-setup.sh --restart-incus  # the same for Incus
#   bash tests/host-setup.sh --restart-all    # both (the tests do this after installing their
#                                             # CA: each daemon reads the system CA store once,
#                                             # at start)
set -euo pipefail

LXD_LOG=/var/log/lxd-test.log
INCUS_LOG=/var/log/incus-test.log
PACKAGES=(
    lxd nginx-light busybox-static squashfs-tools xz-utils qemu-utils xdelta3 debootstrap
    openssl ca-certificates curl python3-venv man-db chromium openssh-server rsync
    python3-click python3-cryptography python3-pytest python3-pytest-timeout
    python3-yaml python3-hypothesis tcpdump
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

install_incus() {
    # incus-extra: incus-simplestreams, the baseline of bench/bench_import.py
    if installed incus && installed incus-extra; then
        say "incus: present"
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
    say "installing incus ${target[*]+"${target[*]}"}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${target[@]+"${target[@]}"}" incus incus-extra
}

# -- the daemons: LXD and Incus take the same steps with their own commands ------------------
# $1 is lxd or incus.

client() { if [ "$1" = lxd ]; then echo lxc; else echo incus; fi; }
admin() { if [ "$1" = lxd ]; then echo lxd; else echo incus admin; fi; }
daemon_log() { if [ "$1" = lxd ]; then echo "$LXD_LOG"; else echo "$INCUS_LOG"; fi; }

daemon_binary() {
    local b
    if [ "$1" = lxd ]; then
        command -v lxd && return
    else
        for b in /usr/libexec/incus/incusd /usr/lib/incus/incusd /usr/sbin/incusd \
            /usr/bin/incusd; do
            [ -x "$b" ] && { echo "$b"; return; }
        done
    fi
    die "no $1 daemon binary: is the package installed?"
}

daemon_up() { "$(client "$1")" info >/dev/null 2>&1; }

# Closes every descriptor above 2 of the calling (sub)shell.
close_inherited() {
    local fd
    for fd in $(ls "/proc/$BASHPID/fd"); do
        if [ "$fd" -gt 2 ]; then
            eval "exec $fd>&-" 2>/dev/null || true
        fi
    done
}

start_daemon() {
    local log
    log=$(daemon_log "$1")
    if daemon_up "$1"; then
        say "$1 daemon: already running"
        return
    fi
    say "starting the $1 daemon (log: $log)"
    # setsid + nohup and no inherited descriptors: the daemon outlives this script, whoever
    # runs it never waits on its output, and it keeps no lock open (run under
    # `flock /tmp/lxd-heavy.lock`, a daemon that inherited the lock's descriptor held it for
    # as long as it ran)
    (
        close_inherited
        exec setsid nohup "$(daemon_binary "$1")" --group root --logfile "$log" \
            </dev/null >>"$log" 2>&1
    ) &
    # shellcheck disable=SC2046  # admin is one or two words
    $(admin "$1") waitready --timeout 60 || die "$1 did not become ready; see $log"
    daemon_up "$1" || die "$1 is up but '$(client "$1") info' fails; see $log"
}

stop_daemon() {
    daemon_up "$1" || return 0
    say "stopping the $1 daemon"
    # shellcheck disable=SC2046
    $(admin "$1") shutdown --timeout 60 || die "'$(admin "$1") shutdown' failed; see $(daemon_log "$1")"
    local i
    for i in $(seq 1 120); do
        daemon_up "$1" || return 0
        sleep 0.5
    done
    die "$1 still answers after shutdown"
}

ensure_storage() {
    if [ -n "$("$(client "$1")" storage list --format csv)" ]; then
        say "$1 storage: present"
        return
    fi
    # `init --auto` would try to create a bridge and fails to find a free subnet here:
    # a dir pool and a default profile with only a root disk are all the tests need
    say "$1 storage: creating the 'default' dir pool"
    # shellcheck disable=SC2046
    $(admin "$1") init --preseed <<'EOF'
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
        install_incus
        for d in lxd incus; do
            start_daemon "$d"
            ensure_storage "$d"
        done
        ;;
    --restart-lxd | --restart-incus)
        d=${1#--restart-}
        stop_daemon "$d"
        start_daemon "$d"
        ;;
    --restart-all)
        for d in lxd incus; do
            stop_daemon "$d"
            start_daemon "$d"
        done
        ;;
    *)
        die "unknown argument: $1 (expected nothing, --restart-lxd, --restart-incus, --restart-all)"
        ;;
esac
say "ready"
