#!/bin/sh
# Entrypoint of the PostgreSQL test image (tests/containers/postgres/Dockerfile): what the
# compose file uses of the official image's interface, nothing more.
#   POSTGRES_USER (default postgres), POSTGRES_DB (default: the user), and the superuser's
#   password in POSTGRES_PASSWORD_FILE (first line) or POSTGRES_PASSWORD.
# First start on an empty $PGDATA: initdb with that user and password, password
# (scram-sha-256) auth from every host, listening on all interfaces, then the database.
# Started as root it makes $PGDATA the postgres user's and re-executes itself as that user;
# the server then replaces this shell (PID 1), so the stop signal reaches it directly.
set -eu

PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA

case "${1:-}" in
    "" | -*) set -- postgres "$@" ;;  # only server options: they are the server's
    postgres) ;;
    *) exec "$@" ;;  # another command (a shell, psql): run as it is
esac

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

export HOME=/var/lib/postgresql
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        password=$(head -n 1 "$POSTGRES_PASSWORD_FILE")
    else
        password=${POSTGRES_PASSWORD:-}
    fi
    if [ -z "$password" ]; then
        echo "entrypoint: set POSTGRES_PASSWORD_FILE or POSTGRES_PASSWORD" >&2
        exit 1
    fi
    work=$(mktemp -d)
    printf '%s\n' "$password" > "$work/password"
    initdb --username="$user" --pwfile="$work/password" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$work/password"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.auto.conf"
    if [ "$db" != postgres ]; then
        # A private socket and no TCP: nobody (nor pg_isready) sees this server.
        pg_ctl --wait --silent -o "-c listen_addresses='' -c unix_socket_directories=$work" start
        createdb --host="$work" --username="$user" -- "$db"
        pg_ctl --wait --silent --mode=fast stop
    fi
    rmdir "$work"
    echo "entrypoint: initialised $PGDATA (user $user, database $db)"
fi

shift
exec postgres "$@"
