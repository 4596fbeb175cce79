#!/usr/bin/env bash
# deploy/services.sh: make sure the local services that segnode's tests (and a production-like run on
# one machine) talk to are up: PostgreSQL on 127.0.0.1:5432 with trust auth and a database "test", and
# Redis on 127.0.0.1:6379.
#
#   deploy/services.sh start    start what is not running (installing the Debian package if missing)
#   deploy/services.sh status   print what answers; exit 1 if something does not
#
# A service that is already running is left exactly as it is. One that cannot be brought up makes the
# script fail loudly: the tests never skip because a service is missing.
# Debian only (apt-get, pg_ctlcluster); run as root, or as a user with sudo.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=${SERVICES_PG_PORT:-5432}  # overridable only to try this script beside running services
REDIS_HOST=127.0.0.1
REDIS_PORT=${SERVICES_REDIS_PORT:-6379}

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

have_pkg() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

apt_install() {
    local missing=() pkg
    for pkg in "$@"; do have_pkg "$pkg" || missing+=("$pkg"); done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" </dev/null
}

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1; }

psql_admin() {
    # -w: never prompt for a password; trust auth is what we expect.
    psql -w -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres "$@" </dev/null
}

pg_version() {
    [ -d /etc/postgresql ] || return 1
    # shellcheck disable=SC2012  # names are plain version numbers
    ls /etc/postgresql | sort -V | tail -n 1
}

ensure_trust_for_loopback() {
    # Only used when we start the cluster ourselves: a fresh Debian cluster asks for passwords over TCP.
    local hba=$1
    if grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        return 0
    fi
    log "adding trust auth for 127.0.0.1 to $hba"
    # pg_hba.conf is first match wins: put our lines before every other rule.
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
}

pg_login() { psql_admin -tAc 'SELECT 1' >/dev/null 2>&1; }

start_postgres() {
    local ver=""
    if pg_ready; then
        log "PostgreSQL already answers on $PG_HOST:$PG_PORT"
    else
        apt_install postgresql
        ver=$(pg_version) || die "no cluster configuration under /etc/postgresql after installing postgresql"
        if [ ! -f "/etc/postgresql/$ver/main/postgresql.conf" ]; then
            log "creating cluster $ver/main"
            as_root pg_createcluster "$ver" main
        fi
        ensure_trust_for_loopback "/etc/postgresql/$ver/main/pg_hba.conf"
        log "starting PostgreSQL $ver/main"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
        for _ in $(seq 1 60); do
            pg_ready && break
            sleep 0.5
        done
        pg_ready || die "PostgreSQL does not answer on $PG_HOST:$PG_PORT (see /var/log/postgresql/)"
    fi
    if ! pg_login && ver=$(pg_version) && [ -f "/etc/postgresql/$ver/main/pg_hba.conf" ]; then
        # A freshly installed cluster that its package started asks for passwords over TCP.
        ensure_trust_for_loopback "/etc/postgresql/$ver/main/pg_hba.conf"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || true
        sleep 1
    fi
    pg_login || die "cannot log in to PostgreSQL as postgres on $PG_HOST:$PG_PORT without a password" \
        "(the tests need trust auth for 127.0.0.1)"
    if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
        log "creating database test"
        psql_admin -c 'CREATE DATABASE test'
    fi
}

redis_ready() {
    [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

start_redis() {
    if command -v redis-cli >/dev/null 2>&1 && redis_ready; then
        log "Redis already answers on $REDIS_HOST:$REDIS_PORT"
        return 0
    fi
    apt_install redis-server
    as_root mkdir -p /var/lib/redis /var/log/redis
    log "starting Redis on $REDIS_HOST:$REDIS_PORT"
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 1 40); do
        redis_ready && return 0
        sleep 0.25
    done
    die "Redis does not answer on $REDIS_HOST:$REDIS_PORT (see /var/log/redis/ci.log)"
}

status() {
    local rc=0
    if pg_ready; then log "PostgreSQL: up on $PG_HOST:$PG_PORT"; else log "PostgreSQL: DOWN"; rc=1; fi
    if command -v redis-cli >/dev/null 2>&1 && redis_ready; then
        log "Redis: up on $REDIS_HOST:$REDIS_PORT"
    else
        log "Redis: DOWN"; rc=1
    fi
    return "$rc"
}

case "${1:-}" in
    start) start_postgres; start_redis ;;
    status) status ;;
    *) echo "usage: $0 start|status" >&2; exit 2 ;;
esac
