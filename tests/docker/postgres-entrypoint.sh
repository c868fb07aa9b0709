#!/bin/sh
# Entrypoint of the test-only PostgreSQL image (postgres.Dockerfile), after the official image's: on an empty $PGDATA
# create the cluster with POSTGRES_USER / POSTGRES_PASSWORD (password logins over TCP), create POSTGRES_DB and run
# /docker-entrypoint-initdb.d/*.sql in it, then exec the server as user postgres.
set -eu
if [ "${1:-}" != postgres ]; then
    exec "$@"
fi
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
shift
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?is required (as for the official postgres image)}"
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --encoding=UTF8 --locale=C --auth-local=trust \
        --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    # A private socket folder and no TCP while initialising: health checks see the server only when it is done.
    init_socket="$(mktemp -d)"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k $init_socket" -w start >/dev/null
    if [ "$db" != postgres ]; then
        psql -h "$init_socket" -U "$user" -d postgres -v ON_ERROR_STOP=1 -q -c "CREATE DATABASE \"$db\""
    fi
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$f" ] || continue
        echo "postgres-entrypoint: running $f"
        psql -h "$init_socket" -U "$user" -d "$db" -v ON_ERROR_STOP=1 -q -f "$f"
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    rmdir "$init_socket"
fi
exec postgres -c listen_addresses='*' "$@"
