#!/usr/bin/env bash
# How fast the store's purge statement deletes expired records, and what the
# records table costs on disk, measured with psql alone (no build):
#
#   bash bench/purge_rate.sh [DATABASE_URL] [ROWS] [BATCH]
#
# DATABASE_URL defaults to $DATABASE_URL, then postgres://postgres@127.0.0.1:5432/postgres;
# ROWS (expired records to purge) to 2000000; BATCH to 10000, the batch of
# `idempotency-admin purge` and of the README's purge task. LIVE_ROWS
# (environment, default 0) adds that many unexpired records, which the purge
# must leave alone.
#
# In a scratch schema purge_rate_<pid>, always dropped at the end (also on
# failure or Ctrl-C), it:
#   1. creates the records table with migrations/0001_idempotency_records.sql
#      as it is (search_path points at the scratch schema), and turns
#      autovacuum off for that one table so that no vacuum runs during the
#      timing;
#   2. inserts ROWS expired records of realistic size (a 30-byte Stripe-like
#      event id, a 300-byte JSON response body, the stored content-type
#      header), their expiry spread over the past day in insertion order, as
#      completions arrive; then LIVE_ROWS unexpired ones;
#   3. reports the table's and its indexes' sizes, per million records;
#   4. runs the purge statement of src/store/postgres/sql.rs
#      (OperationsSql::purge_batch) as PostgresStore::purge_expired does: a
#      prepared statement, each batch its own autocommitted transaction, until
#      a batch deletes fewer than BATCH rows; and prints the rate;
#   5. checks that no expired record is left and every live one is, reports
#      the dead tuples left behind, and times the VACUUM that clears them,
#      throttled as this server's autovacuum would be.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

URL="${1:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}"
ROWS="${2:-2000000}"
BATCH="${3:-10000}"
LIVE="${LIVE_ROWS:-0}"
SCHEMA="purge_rate_$$"
MIGRATION="migrations/0001_idempotency_records.sql"

fail() { printf 'purge_rate: %s\n' "$*" >&2; exit 2; }
for value in "$ROWS" "$BATCH" "$LIVE"; do
    [[ "$value" =~ ^[0-9]+$ ]] || fail "ROWS, BATCH and LIVE_ROWS must be whole numbers (got '$value')"
done
(( ROWS > 0 && BATCH > 0 )) || fail "ROWS and BATCH must be greater than 0"
command -v psql >/dev/null || fail "psql is needed (Debian: apt-get install postgresql-client)"
[[ -f "$MIGRATION" ]] || fail "$MIGRATION is missing"

# Every psql session: no ~/.psqlrc, stop at the first error, the scratch schema.
sql() { PGOPTIONS="-c search_path=$SCHEMA" psql "$URL" -qX -v ON_ERROR_STOP=1 "$@"; }
value() { sql -At -c "$1"; }

psql "$URL" -qX -c 'SELECT 1' >/dev/null 2>&1 \
    || fail "cannot connect to $URL (set DATABASE_URL or pass the URL as the first argument)"
cleanup() { psql "$URL" -qX -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

psql "$URL" -qX -v ON_ERROR_STOP=1 -c "CREATE SCHEMA $SCHEMA"
sql -f "$MIGRATION"
sql -c "ALTER TABLE idempotency_records SET (autovacuum_enabled = false)"

printf 'PostgreSQL %s, %s cores, load average %s\n' \
    "$(value 'SHOW server_version')" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'seeding %s expired and %s live records in %s ...\n' "$ROWS" "$LIVE" "$SCHEMA"

# One kind of record, expired or live: `kind` names the rows, `expiry` gives
# the expires_at of row n of `count`.
seed() { # kind count expiry
    sql -v count="$2" <<SQL
INSERT INTO idempotency_records
    (source, event_type, key, fingerprint, state, response_status, response_headers, response_body,
     created_at, completed_at, expires_at)
SELECT 'stripe', 'payment_intent.succeeded', e.key, sha256(convert_to(e.key, 'UTF8')), 2, 200,
       -- content-type: application/json, encoded as the layer stores headers
       '\\x0100000001000c636f6e74656e742d74797065000000106170706c69636174696f6e2f6a736f6effffffff'::bytea,
       convert_to(format('{"id":"le_%s","object":"ledger_entry","event_id":"%s","amount":%s,"currency":"eur",'
                         '"status":"succeeded","customer":"cus_%s","created":%s,"description":"%s"}',
                         substr(md5(e.key), 1, 24), e.key, 100 + n % 99900, substr(md5(e.key || 'c'), 1, 14),
                         1700000000 + n, repeat('x', 73)), 'UTF8'),
       e.expires_at - interval '30 days', e.expires_at - interval '30 days' + interval '50 milliseconds',
       e.expires_at
FROM generate_series(1, :count::int8) AS n,
     LATERAL (SELECT 'evt_' || substr(md5('$1' || n), 1, 26) AS key, $3 AS expires_at) AS e;
SQL
}
started=$(date +%s.%N)
seed expired "$ROWS" "now() - interval '1 day' + n * (interval '23 hours' / :count::int8)"
if (( LIVE > 0 )); then
    seed live "$LIVE" "now() + interval '1 day' + n * (interval '23 hours' / :count::int8)"
fi
sql -c 'ANALYZE idempotency_records'
printf 'seeded in %.0f s\n' "$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')"

sizes() { # label
    sql -At -F ' ' -c "
        SELECT pg_relation_size('idempotency_records'),
               pg_indexes_size('idempotency_records'),
               pg_total_relation_size('idempotency_records'),
               pg_relation_size('idempotency_records_pkey'),
               pg_relation_size('idempotency_records_expires_at')" \
    | awk -v label="$1" -v rows="$((ROWS + LIVE))" '{
        mib = 1048576; per = 1e6 / rows
        printf "%s: table %.0f MiB, indexes %.0f MiB (primary key %.0f, expires_at %.0f), total %.0f MiB", \
            label, $1/mib, $2/mib, $4/mib, $5/mib, $3/mib
        printf "; per million records: table %.0f MiB, indexes %.0f MiB, total %.0f MiB\n", \
            $1/mib*per, $2/mib*per, $3/mib*per }'
}
sizes "after seeding $((ROWS + LIVE)) records"
printf 'average stored row: %s bytes\n' \
    "$(value 'SELECT round(avg(pg_column_size(r.*))) FROM (SELECT * FROM idempotency_records LIMIT 100000) r')"

# The statement of OperationsSql::purge_batch, with live("") expanded
# (COMPLETED = 2, IN_PROGRESS = 1). PostgresStore::purge_expired loops until
# a batch deletes fewer than the batch size: floor(ROWS / BATCH) + 1 batches.
BATCHES=$((ROWS / BATCH + 1))
TIMINGS=$(mktemp)
trap 'rm -f "$TIMINGS"; cleanup' EXIT
{
    cat <<'SQL'
PREPARE purge_batch(int8) AS
DELETE FROM "idempotency_records" WHERE ctid = ANY(ARRAY(
     SELECT ctid FROM "idempotency_records"
     WHERE expires_at <= now() AND NOT ((state = 2 AND expires_at > now())
          OR (state = 1 AND (locked_until > now()) IS TRUE))
     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED));
SELECT clock_timestamp() AS purge_started \gset
\timing on
SQL
    for _ in $(seq "$BATCHES"); do printf 'EXECUTE purge_batch(%s);\n' "$BATCH"; done
    printf '\\timing off\n'
    printf "SELECT 'elapsed ' || extract(epoch FROM clock_timestamp() - :'purge_started'::timestamptz);\n"
} | sql -At >"$TIMINGS"

elapsed=$(awk '/^elapsed /{print $2}' "$TIMINGS")
times=$(awk '/^Time: /{print $2}' "$TIMINGS")
batches=$(wc -l <<<"$times")
awk -v rows="$ROWS" -v batch="$BATCH" -v batches="$batches" -v elapsed="$elapsed" 'BEGIN {
    rate = rows / elapsed
    printf "purged %d expired records in %d batches of %d in %.2f s: %.0f records/s (%.1f million a day)\n", \
        rows, batches, batch, elapsed, rate, rate * 86400 / 1e6 }'
last_full=none
(( batches > 1 )) && last_full=$(sed -n "$((batches - 1))p" <<<"$times")
printf 'batch time (ms): first %s, last full %s, median %s, slowest %s\n' \
    "$(sed -n 1p <<<"$times")" "$last_full" \
    "$(sort -n <<<"$times" | sed -n "$(((batches + 1) / 2))p")" "$(sort -n <<<"$times" | tail -n 1)"

left=$(value "SELECT count(*) FILTER (WHERE expires_at <= now()) || ' ' || count(*) FILTER (WHERE expires_at > now())
              FROM idempotency_records")
[[ "$left" == "0 $LIVE" ]] || fail "after the purge: $left (expired, live) records; expected 0 $LIVE"
printf 'left: 0 expired, %s live records\n' "$LIVE"
# The purging session has ended, so its statistics have been reported.
printf 'dead tuples left for vacuum: %s\n' \
    "$(value "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'idempotency_records'::regclass")"
sizes "after the purge"
# VACUUM throttled as this server's autovacuum is (autovacuum_vacuum_cost_delay
# and _limit, -1 meaning vacuum_cost_delay and _limit): what autovacuum would spend.
delay=$(value 'SHOW autovacuum_vacuum_cost_delay')
[[ "$delay" == "-1" ]] && delay=$(value 'SHOW vacuum_cost_delay')
limit=$(value 'SHOW autovacuum_vacuum_cost_limit')
[[ "$limit" == "-1" ]] && limit=$(value 'SHOW vacuum_cost_limit')
vacuum=$(sql -At -c "SET vacuum_cost_delay = '$delay'" -c "SET vacuum_cost_limit = $limit" \
             -c '\timing on' -c 'VACUUM idempotency_records' | awk '/^Time: /{print $2}')
printf 'VACUUM after the purge, throttled as autovacuum is here (cost delay %s, limit %s): %.1f s\n' \
    "$delay" "$limit" "$(awk -v ms="$vacuum" 'BEGIN { print ms / 1000 }')"
sizes "after VACUUM"
