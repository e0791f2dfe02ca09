#!/usr/bin/env bash
# What Postgres alone allows: the layer's statements for a first delivery and
# a duplicate, driven by pgbench with no HTTP server and no Rust at all,
# against the example handler's bare INSERT, in one run:
#
#   bash bench/protocol.sh
#
# Scripts (each PROTOCOL_SECONDS long, PROTOCOL_CLIENTS clients, prepared
# statements; a new event id every transaction):
#   bare         the handler's INSERT into ledger_entries, autocommitted
#   naive        claim row INSERT, handler INSERT, UPDATE with the response:
#                three autocommitted statements, three round trips
#   layer        the layer's first delivery, one statement a round trip:
#                BEGIN, try-lock, read, handler INSERT, record upsert, COMMIT
#   pipelined    the same six statements in the layer's three round trips,
#                one Sync each (what a driver with pipeline mode would send)
#   one-trip     the same six statements in one round trip: impossible for
#                the layer (the handler runs between its claim and its
#                commit), shown to separate the cost of the statements from
#                that of the round trips
#   duplicate    the layer's read of a completed record (one round trip)
# The layer sends the pipelined round trips with one Sync per statement, so
# its cost lies between `layer` and `pipelined`. Settings (environment):
# DATABASE_URL, PROTOCOL_SECONDS [10], PROTOCOL_CLIENTS [16].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
SECONDS_EACH="${PROTOCOL_SECONDS:-10}"
CLIENTS="${PROTOCOL_CLIENTS:-16}"
SCHEMA="bench_protocol_$$"
WORK="$(mktemp -d)"; [ -z "${PROTOCOL_KEEP:-}" ] || echo "scripts in $WORK" >&2
cleanup() {
    psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
    [ -n "${PROTOCOL_KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

command -v pgbench >/dev/null || { echo "pgbench is missing (it comes with the Postgres server; Debian: postgresql-15)" >&2; exit 1; }
psql "$DATABASE_URL" -qAtc 'SELECT 1' >/dev/null 2>&1 ||
    { echo "cannot reach Postgres at DATABASE_URL=$DATABASE_URL" >&2; exit 1; }

# The example's ledger table and the store's record table, as migrate() makes it.
psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE SCHEMA $SCHEMA;
CREATE TABLE $SCHEMA.ledger_entries (
    id bigserial primary key, source text not null,
    event_id text not null, event_type text not null default '',
    amount_cents bigint not null default 0,
    created_at timestamptz not null default now());
CREATE TABLE $SCHEMA.records (
    source text NOT NULL, event_type text NOT NULL DEFAULT '', key text NOT NULL,
    fingerprint bytea NOT NULL, state smallint NOT NULL, claim_token uuid,
    locked_until timestamptz, response_status smallint, response_headers bytea,
    response_body bytea, created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz, expires_at timestamptz NOT NULL,
    PRIMARY KEY (source, event_type, key));
CREATE INDEX ON $SCHEMA.records (expires_at);
INSERT INTO $SCHEMA.records VALUES ('stripe', 'payment_intent.succeeded', 'evt_dup', '\x00', 2, NULL, NULL,
    200, '\x', '{"ledger_entry_id":1}', now(), now(), now() + interval '30 days');
SQL

# pgbench's :client_id and a random number make each event id unique.
ID="'evt_' || :client_id::text || '_' || :n::text"
SET_N='\set n random(1, 9000000000000000000)'
LOOKUP="SELECT state, fingerprint, response_status, response_headers, response_body, expires_at FROM $SCHEMA.records
  WHERE source = 'stripe' AND event_type = 'payment_intent.succeeded' AND key = KEY
  AND expires_at > now() AND (state = 2 OR locked_until > now());"
INSERT_LEDGER="INSERT INTO $SCHEMA.ledger_entries (source, event_id, event_type, amount_cents)
  VALUES ('stripe', $ID, 'payment_intent.succeeded', 100) RETURNING id;"
UPSERT="INSERT INTO $SCHEMA.records AS r (source, event_type, key, fingerprint, state, response_status,
  response_headers, response_body, created_at, completed_at, expires_at)
  VALUES ('stripe', 'payment_intent.succeeded', $ID, '\\x0123456789abcdef0123456789abcdef', 2, 200, '\\x',
  '{\"ledger_entry_id\":1}', now(), clock_timestamp(), clock_timestamp() + 2592000 * interval '1 second')
  ON CONFLICT (source, event_type, key) DO UPDATE SET state = 2, response_status = EXCLUDED.response_status,
  response_body = EXCLUDED.response_body, expires_at = EXCLUDED.expires_at;"

one_line() { tr '\n' ' ' | sed 's/  */ /g'; echo; }

{ echo "$SET_N"; echo "$INSERT_LEDGER" | one_line; } >"$WORK/bare.sql"
{
    echo "$SET_N"
    echo "INSERT INTO $SCHEMA.records (source, event_type, key, fingerprint, state, expires_at)
      VALUES ('stripe', 'payment_intent.succeeded', $ID, '\\x00', 1, now() + interval '1 day');" | one_line
    echo "$INSERT_LEDGER" | one_line
    echo "UPDATE $SCHEMA.records SET state = 2, response_status = 200, response_body = '{}'
      WHERE source = 'stripe' AND event_type = 'payment_intent.succeeded' AND key = $ID;" | one_line
} >"$WORK/naive.sql"
first_delivery() { # plain, pipelined or one-trip
    echo "$SET_N"
    [ "$1" = plain ] || echo '\startpipeline'
    echo "BEGIN ISOLATION LEVEL READ COMMITTED;"
    echo "SELECT pg_try_advisory_xact_lock(hashtextextended($ID, 0));"
    echo "$LOOKUP" | sed "s/KEY/$ID/" | one_line
    [ "$1" = pipelined ] && echo '\endpipeline'
    echo "$INSERT_LEDGER" | one_line
    [ "$1" = pipelined ] && echo '\startpipeline'
    echo "$UPSERT" | one_line
    echo "COMMIT;"
    [ "$1" = plain ] || echo '\endpipeline'
}
first_delivery plain >"$WORK/layer.sql"
first_delivery pipelined >"$WORK/pipelined.sql"
first_delivery one-trip >"$WORK/one-trip.sql"
echo "$LOOKUP" | sed "s/KEY/'evt_dup'/" | one_line >"$WORK/duplicate.sql"

run() { # script; prints tps and mean latency, or stops the run when a transaction failed
    pgbench "$DATABASE_URL" -n -M prepared -c "$CLIENTS" -j 2 -T "$SECONDS_EACH" -f "$WORK/$1.sql" >"$WORK/$1.out" 2>&1 || true
    if grep -qiE 'error|abort' "$WORK/$1.out" || ! grep -q '^tps =' "$WORK/$1.out"; then
        echo "pgbench failed on $1:" >&2
        cat "$WORK/$1.out" >&2
        exit 1
    fi
    awk '/^latency average/ { latency = $4 } /^tps =/ { tps = $3 } END { print tps, latency }' "$WORK/$1.out"
}

echo "tower-idempotency protocol benchmark (pgbench, no HTTP), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "$CLIENTS clients, ${SECONDS_EACH}s each, -M prepared; Postgres $(psql "$DATABASE_URL" -qAtc 'SHOW server_version');" \
    "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
SCRIPTS="bare naive layer pipelined one-trip duplicate"
declare -A TPS LATENCY
for script in $SCRIPTS bare-again; do
    result="$(run "${script%-again}")"
    read -r "TPS[$script]" "LATENCY[$script]" <<<"$result"
done
BARE="$(echo "(${TPS[bare]} + ${TPS[bare-again]}) / 2" | bc -l)"
printf '%-10s %10s %8s %12s\n' script tps "x bare" "latency ms"
for script in $SCRIPTS bare-again; do
    printf '%-10s %10.0f %8.2f %12s\n' "$script" "${TPS[$script]}" "$(echo "${TPS[$script]} / $BARE" | bc -l)" "${LATENCY[$script]}"
done
echo "noise: bare $(printf %.0f "${TPS[bare]}") tps first, $(printf %.0f "${TPS[bare-again]}") last" \
    "($(echo "100 * (${TPS[bare-again]} - ${TPS[bare]}) / ${TPS[bare]}" | bc -l | xargs printf %+.1f)%); ratios use their mean"
