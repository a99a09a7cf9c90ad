#!/usr/bin/env bash
# A throwaway PostgreSQL server on the loopback interface, for the tests' PostgreSQL variants
# (KDBENCH_TEST_STORE_URL: tests/store_helpers.py store_location, tests/test_secrets.py,
# tests/test_store_reliability.py). .ci/run starts one around the test command.
#
#   url=$(bash scripts/postgres.sh start)   # installs Debian's server where missing, makes a new
#                                           # cluster, starts it, prints the SQLAlchemy URL
#   bash scripts/postgres.sh stop           # stops it and removes the cluster
#
# The cluster lives in $KDBENCH_PG_DIR (default /tmp/kdbench-postgres) and listens on
# 127.0.0.1:$KDBENCH_PG_PORT (default 55432, not the usual 5432, so a server already on the
# machine is left alone) and on a socket in that folder. The URL's user may create databases (each
# fixture store is a new database, dropped when the tests end). Its password has the characters a
# URL must escape, so the secrets test can check that neither spelling is ever printed or stored.
# The URL goes to stdout and nothing else does: the caller keeps it in a variable, never in a log.
# Needs root (or sudo): apt-get, and the server runs as the `postgres` user the package creates.
set -euo pipefail

DIR=${KDBENCH_PG_DIR:-/tmp/kdbench-postgres}
PORT=${KDBENCH_PG_PORT:-55432}
ROLE=kdbench
PASSWORD='P@ss:w0rd/x'
ENCODED='P%40ss%3Aw0rd%2Fx'  # the same, percent-encoded for the URL

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""; AS_PG=(runuser -u postgres --)
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"; AS_PG=(sudo -u postgres)
else
    echo "postgres.sh: needs root (or sudo) to install and run the server" >&2
    exit 1
fi

server_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

stop() {
    local bin; bin=$(server_bin)
    if [ -n "$bin" ] && [ -f "$DIR/data/postmaster.pid" ]; then
        "${AS_PG[@]}" "$bin/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    $SUDO rm -rf "$DIR"
}

start() {
    if [ -z "$(server_bin)" ] || ! id postgres >/dev/null 2>&1; then
        echo "[postgres] installing Debian's postgresql server" >&2
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq >&2
        $SUDO apt-get install -y -qq postgresql >/dev/null
    fi
    local bin; bin=$(server_bin)
    stop  # a cluster left by an earlier, killed run
    $SUDO mkdir -p "$DIR"
    $SUDO chown postgres "$DIR"
    "${AS_PG[@]}" "$bin/initdb" -D "$DIR/data" -U postgres -A trust --auth-host=scram-sha-256 >/dev/null
    "${AS_PG[@]}" "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200 -c fsync=off" start >/dev/null
    # the password goes in on stdin, never on a command line another user's `ps` could read
    printf "CREATE ROLE %s LOGIN CREATEDB PASSWORD '%s';\n" "$ROLE" "$PASSWORD" \
        | "${AS_PG[@]}" "$bin/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -q -v ON_ERROR_STOP=1 >/dev/null
    echo "[postgres] $("${AS_PG[@]}" "$bin/postgres" --version) on 127.0.0.1:$PORT (cluster in $DIR)" >&2
    echo "postgresql+psycopg://$ROLE:$ENCODED@127.0.0.1:$PORT/postgres"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: bash scripts/postgres.sh start|stop" >&2; exit 2 ;;
esac
