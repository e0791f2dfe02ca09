# PgBouncer in transaction mode in front of a Postgres, as the pooler tests
# expect it (tests/support/pgbouncer.rs writes the same configuration when it
# starts its own). Sourced by .ci/run and bench/pool_modes.sh:
#
#   pgbouncer_start URL   starts PgBouncer (`pgbouncer` on PATH, or
#                         /usr/sbin/pgbouncer) in front of URL's server, as
#                         URL's role, on the first free port from 6432, in a
#                         temporary directory of its own; sets PGBOUNCER_DIR,
#                         PGBOUNCER_PORT and PGBOUNCER_URL (URL's role and
#                         database, through PgBouncer). If it does not answer
#                         within 30 s, prints its log and exits the shell.
#   pgbouncer_stop        stops it and removes its directory; does nothing
#                         when none was started. Call it on exit, whatever the
#                         exit.
#
# PgBouncer 1.18 (Debian 12's) carries no prepared statements in transaction
# mode. Only extra_float_digits is ignored among startup parameters, so that
# an `options` parameter is refused as in production. auth_query lets any
# role in without a password (trust): each role gets a server pool of its
# own, and its schema through its search_path. PgBouncer refuses to run as
# root: as root, it runs as postgres.

PGBOUNCER_DIR=""
PGBOUNCER_PORT=""

pgbouncer_start() { # URL
    local url="$1" binary upstream_host upstream_port upstream_user upstream_database
    binary="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
    # Where URL's server is, as whom, and which database.
    read -r upstream_host upstream_port upstream_user upstream_database < <(psql -X "$url" -Atc \
        "SELECT coalesce(host(inet_server_addr()), '127.0.0.1'), coalesce(inet_server_port(), 5432),
                current_user, current_database()" | tr '|' ' ')
    PGBOUNCER_PORT=6432
    while (exec 3<>"/dev/tcp/127.0.0.1/$PGBOUNCER_PORT") 2>/dev/null; do
        PGBOUNCER_PORT=$((PGBOUNCER_PORT + 1))
    done
    PGBOUNCER_DIR="$(mktemp -d)"
    printf '"%s" ""\n' "$upstream_user" >"$PGBOUNCER_DIR/userlist.txt"
    cat >"$PGBOUNCER_DIR/pgbouncer.ini" <<INI
[databases]
* = host=$upstream_host port=$upstream_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
pidfile = $PGBOUNCER_DIR/pgbouncer.pid
logfile = $PGBOUNCER_DIR/pgbouncer.log
pool_mode = transaction
ignore_startup_parameters = extra_float_digits
auth_type = trust
auth_file = $PGBOUNCER_DIR/userlist.txt
auth_user = $upstream_user
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename = \$1
max_client_conn = 1000
default_pool_size = 40
server_idle_timeout = 10
INI
    if [ "$(id -u)" = 0 ]; then
        chown -R postgres "$PGBOUNCER_DIR"
        su postgres -s /bin/sh -c "'$binary' -d '$PGBOUNCER_DIR/pgbouncer.ini'"
    else
        "$binary" -d "$PGBOUNCER_DIR/pgbouncer.ini"
    fi
    PGBOUNCER_URL="postgres://$upstream_user@127.0.0.1:$PGBOUNCER_PORT/$upstream_database"
    for _ in $(seq 30); do
        psql -X "$PGBOUNCER_URL" -Atc 'SELECT 1' >/dev/null 2>&1 && break
        sleep 1
    done
    if ! psql -X "$PGBOUNCER_URL" -Atc 'SELECT 1' >/dev/null; then
        cat "$PGBOUNCER_DIR/pgbouncer.log" >&2 || true
        exit 1
    fi
}

pgbouncer_stop() {
    if [ -n "$PGBOUNCER_DIR" ] && [ -f "$PGBOUNCER_DIR/pgbouncer.pid" ]; then
        kill "$(cat "$PGBOUNCER_DIR/pgbouncer.pid")" 2>/dev/null || true
    fi
    [ -z "$PGBOUNCER_DIR" ] || rm -rf "$PGBOUNCER_DIR"
    PGBOUNCER_DIR=""
}
