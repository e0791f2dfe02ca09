#!/usr/bin/env bash
# The example receiver on both Postgres drivers in one run, interleaved
# round by round: DATABASE_DRIVER=tokio-postgres and DATABASE_DRIVER=sqlx,
# the same release build (built here with --features sqlx), each round on a
# fresh scratch schema:
#
#   bash bench/drivers.sh [ROUNDS]
#
# Each start measures, at 16 connections, first deliveries (8 s), duplicates
# (6 s) and /baseline (6 s, the same handler without the layer, on the same
# driver), each after its own warm-up. The receiver's other settings come
# from the environment (RECORD_MODE=lease, RECORD_CACHE_TTL_MS=...). Needs
# wrk, psql and the local Postgres (DATABASE_URL), like bench/run.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS="${1:-3}"
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
SCHEMA="bench_drivers_$$"
case "$DATABASE_URL" in
    *\?*) SCHEMA_URL="$DATABASE_URL&options=-c%20search_path%3D$SCHEMA" ;;
    *) SCHEMA_URL="$DATABASE_URL?options=-c%20search_path%3D$SCHEMA" ;;
esac
command -v wrk >/dev/null || { echo "bench/drivers.sh needs wrk (apt-get install wrk)" >&2; exit 1; }
cargo build --release --features sqlx --example webhook_receiver >&2
BINARY=target/release/examples/webhook_receiver
LOG="$(mktemp)"
PID=""
cleanup() {
    [ -z "$PID" ] || { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
    psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
    rm -f "$LOG"
}
trap cleanup EXIT

rate() { # requests per second from wrk's RESULT line
    grep '^RESULT' | sed 's/.*requests=\([0-9]*\) duration_us=\([0-9]*\).*/\1 \2/' |
        awk '{ printf "%.0f", $1 / ($2 / 1e6) }'
}
load() { # address path keys connections seconds run-id
    BENCH_PATH="$2" BENCH_KEYS="$3" BENCH_RUN="$6" \
        wrk -t"$(($4 < 2 ? $4 : 2))" -c"$4" -d"$5s" --timeout 10s -s bench/wrk.lua "http://$1"
}

measure() { # driver
    psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null 2>&1
    : >"$LOG"
    BIND=127.0.0.1:0 DATABASE_URL="$SCHEMA_URL" DATABASE_DRIVER="$1" "$BINARY" >"$LOG" 2>/dev/null &
    PID=$!
    local address=""
    for _ in $(seq 100); do
        address="$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$LOG" || true)"
        [ -n "$address" ] && break
        sleep 0.1
    done
    [ -n "$address" ] || { echo "the receiver on $1 did not start" >&2; exit 1; }
    local id="drv$RANDOM" first duplicate baseline
    load "$address" /webhooks/stripe unique 16 3 "$id-warm" >/dev/null
    first="$(load "$address" /webhooks/stripe unique 16 8 "$id" | rate)"
    load "$address" /webhooks/stripe fixed 1 1 "$id" >/dev/null
    duplicate="$(load "$address" /webhooks/stripe fixed 16 6 "$id" | rate)"
    load "$address" /baseline unique 16 2 "$id-base-warm" >/dev/null
    baseline="$(load "$address" /baseline unique 16 6 "$id-base" | rate)"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
    local twice
    twice="$(psql "$DATABASE_URL" -Atqc "SELECT count(*) FROM (SELECT event_id FROM $SCHEMA.ledger_entries
        WHERE source = 'stripe' GROUP BY event_id HAVING count(*) > 1) AS runs")"
    [ "$twice" = 0 ] || { echo "$twice events ran twice on $1" >&2; exit 1; }
    printf '%-15s first %6d  duplicate %6d  baseline %6d  first/baseline %.2f  duplicate/baseline %.2f\n' \
        "$1" "$first" "$duplicate" "$baseline" "$(echo "$first / $baseline" | bc -l)" "$(echo "$duplicate / $baseline" | bc -l)"
}

echo "RECORD_MODE=${RECORD_MODE:-transaction} RECORD_CACHE_TTL_MS=${RECORD_CACHE_TTL_MS:-0}, 16 connections, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
    echo "round $round"
    measure tokio-postgres
    measure sqlx
done
