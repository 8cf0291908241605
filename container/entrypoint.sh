#!/bin/sh
# The container's start: turns the environment into `lxd-image-server run` options, then
# becomes that process (tini, PID 1, forwards SIGTERM to it; `run` stops nginx, the upload
# server and the watcher in order and exits 0).
#
#   PLAIN_HTTP=1              plain HTTP on 1080, for a TLS-terminating proxy or ingress in front
#                             (default: HTTPS on 8443 with the certificate mounted at
#                             /etc/lxd-image-server/ssl/nginx.crt + nginx.key, or one made once
#                             and kept in the state volume)
#   LISTEN=[HOST:]PORT        where nginx listens instead (default 8443, or 1080 with PLAIN_HTTP)
#   HTTP_LISTEN=[HOST:]PORT   also serve image files, and nothing else, over plain HTTP there
#                             (for caching proxies; clients try http://HOST first when their
#                             remote is https://HOST; off by default)
#   SERVER_NAMES="a b"        names/addresses clients use: in a generated certificate, and in
#                             the instructions printed at start
#   UPLOAD_USER, UPLOAD_PASSWORD   the upload credentials (a file is made from them each start)
#   /etc/lxd-image-server/htpasswd  or a mounted htpasswd file with the upload users
#   ALLOW_ANONYMOUS_UPLOADS=1 or no credentials at all: the proxy in front authenticates
#   ALLOW_OVERWRITES, ALLOW_DELETES, DEBUG, UPLOAD_MAX_SIZE: read by the program itself
#
# With no credentials configured, uploads are refused (401) and the log says how to enable them.
set -eu

ROOT=/var/www/simplestreams
STATE=/var/lib/lxd-image-server
ETC=/etc/lxd-image-server
SSL=$ETC/ssl
MOUNTED_HTPASSWD=$ETC/htpasswd
ENV_HTPASSWD=$STATE/run/env.htpasswd

say() {
    echo "lxd-image-server-container: $*" >&2
}

# 1/true/yes/on and 0/false/no/off/empty, any case (as the program reads its own flags)
flag() {
    value=$(printenv "$1" 2>/dev/null || true)
    case $(printf '%s' "$value" | tr '[:upper:]' '[:lower:]') in
        1 | true | yes | on) return 0 ;;
        "" | 0 | false | no | off) return 1 ;;
        *)
            say "$1=$value: expected 1/true/yes/on or 0/false/no/off"
            exit 2
            ;;
    esac
}

if [ "$#" -gt 0 ]; then
    # anything else (a shell, `lxd-image-server update`, ...) runs as given
    exec "$@"
fi

for dir in "$ROOT" "$STATE"; do
    if [ ! -w "$dir" ]; then
        say "$dir is not writable by uid $(id -u): give the volume to $(id -u):$(id -g)" \
            "(chown -R $(id -u):$(id -g) on the host; in Kubernetes, fsGroup: $(id -g))"
        exit 1
    fi
done

set -- lxd-image-server --state-dir "$STATE" run --root-dir "$ROOT" --no-create-user

if flag PLAIN_HTTP; then
    set -- "$@" --plain-http --listen "${LISTEN:-1080}"
else
    set -- "$@" --listen "${LISTEN:-8443}"
    if [ -e "$SSL/nginx.crt" ] || [ -e "$SSL/nginx.key" ]; then
        set -- "$@" --ssl-dir "$SSL"
        say "TLS with the mounted certificate $SSL/nginx.crt"
    else
        say "TLS with a self-signed certificate kept in $STATE/ssl" \
            "(mount nginx.crt and nginx.key at $SSL to use your own)"
    fi
fi
if [ -n "${HTTP_LISTEN:-}" ]; then
    set -- "$@" --http-listen "$HTTP_LISTEN"
    say "image files (only them) over plain HTTP on $HTTP_LISTEN"
fi
for name in $(printf '%s' "${SERVER_NAMES:-}" | tr ',' ' '); do
    set -- "$@" --hostname "$name"
done

ways=0
[ -e "$MOUNTED_HTPASSWD" ] && ways=$((ways + 1))
[ -n "${UPLOAD_USER:-}${UPLOAD_PASSWORD:-}" ] && ways=$((ways + 1))
flag ALLOW_ANONYMOUS_UPLOADS && ways=$((ways + 1))
if [ "$ways" -gt 1 ]; then
    say "choose one of: a mounted $MOUNTED_HTPASSWD, UPLOAD_USER + UPLOAD_PASSWORD," \
        "ALLOW_ANONYMOUS_UPLOADS=1"
    exit 2
fi

if [ -e "$MOUNTED_HTPASSWD" ]; then
    set -- "$@" --htpasswd "$MOUNTED_HTPASSWD"
    say "upload credentials from $MOUNTED_HTPASSWD"
elif [ -n "${UPLOAD_USER:-}${UPLOAD_PASSWORD:-}" ]; then
    if [ -z "${UPLOAD_USER:-}" ] || [ -z "${UPLOAD_PASSWORD:-}" ]; then
        say "set both UPLOAD_USER and UPLOAD_PASSWORD, or neither"
        exit 2
    fi
    mkdir -p "$(dirname "$ENV_HTPASSWD")"
    rm -f "$ENV_HTPASSWD"
    printf '%s\n' "$UPLOAD_PASSWORD" |
        lxd-image-server passwd "$UPLOAD_USER" --htpasswd "$ENV_HTPASSWD" >/dev/null
    set -- "$@" --htpasswd "$ENV_HTPASSWD"
    say "upload user $UPLOAD_USER from UPLOAD_USER and UPLOAD_PASSWORD"
elif flag ALLOW_ANONYMOUS_UPLOADS; then
    set -- "$@" --allow-anonymous-uploads
elif ! grep -qs '^[^#[:space:]][^:]*:' "$STATE/htpasswd"; then
    say "uploads are refused (401): no upload credentials. Set UPLOAD_USER and" \
        "UPLOAD_PASSWORD, mount an htpasswd file at $MOUNTED_HTPASSWD, or set" \
        "ALLOW_ANONYMOUS_UPLOADS=1 when a proxy in front authenticates; or add a user to the" \
        "running container: lxd-image-server passwd USER --htpasswd $STATE/htpasswd"
fi

exec "$@"
