#!/usr/bin/env bash
# Interleaved A/B of two builds of the example receiver, for changes smaller
# than the run-to-run noise of bench/run.sh (table growth, checkpoints):
#
#   bash bench/ab.sh OLD_BINARY NEW_BINARY [ROUNDS]
#
# Each round starts each binary in turn on a fresh scratch schema and
# measures, at 16 connections, first deliveries (8 s), duplicates (6 s) and
# /baseline (6 s), each after its own warm-up. Needs wrk, psql and the local
# Postgres (DATABASE_URL), like bench/run.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ $# -ge 2 ] || { echo "usage: bash bench/ab.sh OLD_BINARY NEW_BINARY [ROUNDS]" >&2; exit 2; }
OLD="$1"
NEW="$2"
ROUNDS="${3:-4}"
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
SCHEMA="bench_ab_$$"
case "$DATABASE_URL" in
    *\?*) SCHEMA_URL="$DATABASE_URL&options=-c%20search_path%3D$SCHEMA" ;;
    *) SCHEMA_URL="$DATABASE_URL?options=-c%20search_path%3D$SCHEMA" ;;
esac
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

measure() { # binary label
    psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null 2>&1
    : >"$LOG"
    BIND=127.0.0.1:0 DATABASE_URL="$SCHEMA_URL" "$1" >"$LOG" 2>/dev/null &
    PID=$!
    local address=""
    for _ in $(seq 100); do
        address="$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$LOG" || true)"
        [ -n "$address" ] && break
        sleep 0.1
    done
    [ -n "$address" ] || { echo "$2 did not start" >&2; exit 1; }
    local id="ab$RANDOM" first duplicate baseline
    load "$address" /webhooks/stripe unique 16 3 "$id-warm" >/dev/null
    first="$(load "$address" /webhooks/stripe unique 16 8 "$id" | rate)"
    load "$address" /webhooks/stripe fixed 1 1 "$id" >/dev/null
    duplicate="$(load "$address" /webhooks/stripe fixed 16 6 "$id" | rate)"
    baseline="$(load "$address" /baseline unique 16 6 "$id-base" | rate)"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
    printf '%-4s first %6d  duplicate %6d  baseline %6d  first/baseline %.2f  duplicate/baseline %.2f\n' \
        "$2" "$first" "$duplicate" "$baseline" "$(echo "$first / $baseline" | bc -l)" "$(echo "$duplicate / $baseline" | bc -l)"
}

for round in $(seq "$ROUNDS"); do
    echo "round $round"
    measure "$OLD" old
    measure "$NEW" new
done
