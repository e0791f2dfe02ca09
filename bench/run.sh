#!/usr/bin/env bash
# The layer's cost against a no-layer baseline, measured in one run with one
# load generator (wrk) against the example receiver on the local Postgres:
#
#   bash bench/run.sh
#
# It installs wrk if missing, builds the receiver in release mode, starts it
# on a free port with a scratch schema, and drives, at 1, 16 and 64 connections
# (1: the latency of one request at a time, with no queueing):
#   baseline      POST /baseline: the Stripe handler's ledger INSERT, no layer
#   first         POST /webhooks/stripe, every request a new event
#   duplicate     POST /webhooks/stripe, one completed event over and over
#   concurrent    POST /webhooks/stripe, each new event sent 8 times at once
# in transaction mode (no record cache, then with it) and in lease mode. The
# baseline runs first and again last; their difference is the run's noise.
# It prints req/s and p50/p99 latency with their ratios to the baseline,
# checks that no event ran twice, and drops the schema.
#
# Settings (environment): DATABASE_URL [postgres://postgres@127.0.0.1:5432/postgres],
# BENCH_DURATION seconds per scenario [15], BENCH_WARMUP seconds before each [2],
# BENCH_CONNECTIONS [1 16 64] (1: latency without queueing), BENCH_THREADS wrk threads [2],
# BENCH_SKIP_BUILD=1 to use the binary already built, BENCH_BINARY=path to
# measure another build of the receiver (say, an older commit's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DURATION="${BENCH_DURATION:-15}"
WARMUP="${BENCH_WARMUP:-2}"
CONNECTIONS="${BENCH_CONNECTIONS:-1 16 64}"
THREADS="${BENCH_THREADS:-2}"
GROUP=8
RUN="r$(date +%s)"
SCHEMA="bench_$$"
SERVER_PID=""

log() { printf '%s\n' "$*" >&2; }

# --- tools ---------------------------------------------------------------
need_package() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    fi
}
need_package wrk wrk
need_package psql postgresql-client
need_package curl curl

if ! psql "$DATABASE_URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then
    log "cannot reach Postgres at $DATABASE_URL (start it, e.g. with bash .ci/run, or set DATABASE_URL)"
    exit 1
fi

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ] && [ -z "${BENCH_BINARY:-}" ]; then
    log "building the receiver (release)"
    cargo build --release --example webhook_receiver >&2
fi
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
BINARY="${BENCH_BINARY:-$TARGET_DIR/release/examples/webhook_receiver}"
[ -x "$BINARY" ] || { log "no receiver binary at $BINARY"; exit 1; }
# Logs and results of this run; removed at the end.
mkdir -p "$TARGET_DIR/bench"
WORK="$(mktemp -d "$TARGET_DIR/bench/run.XXXXXX")"
RESULTS="$WORK/results"

# --- scratch schema and the server -----------------------------------------
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
cleanup() {
    stop_server
    psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
    [ -z "${WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql "$DATABASE_URL" -qc "CREATE SCHEMA $SCHEMA" >/dev/null
case "$DATABASE_URL" in
    *\?*) SCHEMA_URL="$DATABASE_URL&options=-c%20search_path%3D$SCHEMA" ;;
    *) SCHEMA_URL="$DATABASE_URL?options=-c%20search_path%3D$SCHEMA" ;;
esac

ADDRESS=""
start_server() { # label, then VAR=value settings
    local label="$1"
    shift
    stop_server
    # Created here: the forked server may not have opened them yet when
    # they are first read.
    : >"$WORK/$label.out"
    : >"$WORK/$label.err"
    env BIND=127.0.0.1:0 DATABASE_URL="$SCHEMA_URL" "$@" "$BINARY" >"$WORK/$label.out" 2>"$WORK/$label.err" &
    SERVER_PID=$!
    for _ in $(seq 200); do
        ADDRESS="$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$WORK/$label.out" || true)"
        [ -n "$ADDRESS" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/$label.err" >&2; exit 1; }
        sleep 0.1
    done
    [ -n "$ADDRESS" ] || { log "the receiver did not start"; exit 1; }
    log "server $label on $ADDRESS ($*)"
}

# --- load ------------------------------------------------------------------
wrk_run() { # path keys connections seconds run-id; prints wrk's RESULT line and its CPU time
    local threads=$((THREADS < $3 ? THREADS : $3))
    BENCH_PATH="$1" BENCH_KEYS="$2" BENCH_RUN="$5" \
        wrk -t"$threads" -c"$3" -d"$4s" --timeout 10s -s bench/wrk.lua "http://$ADDRESS" 2>&1 |
        grep '^RESULT' || { log "wrk failed"; exit 1; }
    # This subshell's children are wrk and grep: their user + system time.
    # (`times` must not run in a pipeline, which would be a shell of its own.)
    times >"$WORK/times"
    awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
                   printf "wrk_cpu_ms=%d\n", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) * 1000 }' "$WORK/times"
}

TICK_US=$((1000000 / $(getconf CLK_TCK)))
cpu_ticks() { # the receiver's, all Postgres processes' and the whole machine's busy CPU ticks
    local receiver postgres busy
    receiver="$(awk '{ print $14 + $15 }' "/proc/$SERVER_PID/stat")"
    postgres="$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$2 == "(postgres)" { s += $14 + $15 } END { print s + 0 }')"
    busy="$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat)"
    echo "$receiver $postgres $busy"
}

outcomes() { # the layer's outcome counters, one "outcome=count" a line
    curl -fsS "http://$ADDRESS/metrics" |
        sed -n 's/^idempotency_requests_total{.*outcome="\([a-z_]*\)".*} \([0-9.e+]*\)$/\1 \2/p' |
        awk '{ sum[$1] += $2 } END { for (o in sum) printf "%s=%d\n", o, sum[o] }' | sort
}

outcome_diff() { # before after
    awk -F= 'NR == FNR { before[$1] = $2; next } { d = $2 - before[$1]; if (d > 0) { printf "%s%s=%d", sep, $1, d; sep = " " } }' \
        <(printf '%s\n' "$1") <(printf '%s\n' "$2")
}

# scenario label path keys connections config
scenario() {
    local label="$1" path="$2" keys="$3" connections="$4" config="$5"
    local id="$RUN-$label-$config-$connections"
    # The warm-up's events are its own, except the duplicate it completes.
    if [ "$keys" = fixed ]; then
        wrk_run "$path" "$keys" 1 1 "$id" >/dev/null
    fi
    if [ "$WARMUP" -gt 0 ]; then
        wrk_run "$path" "$keys" "$connections" "$WARMUP" "$id-warm-up" >/dev/null
    fi
    local before after result ticks_before ticks_after
    before="$(outcomes)"
    ticks_before="$(cpu_ticks)"
    result="$(wrk_run "$path" "$keys" "$connections" "$DURATION" "$id" | tr '\n' ' ')"
    ticks_after="$(cpu_ticks)"
    after="$(outcomes)"
    local cpu
    cpu="$(echo "$ticks_before $ticks_after" |
        awk -v t="$TICK_US" '{ printf "receiver_cpu_us=%d postgres_cpu_us=%d busy_cpu_us=%d", ($4 - $1) * t, ($5 - $2) * t, ($6 - $3) * t }')"
    printf '%s %s %s %s %s outcomes:%s\n' "$label" "$config" "$connections" "$result" "$cpu" \
        "$(outcome_diff "$before" "$after" | tr ' ' ',')" >>"$RESULTS"
    log "  $label ($config, $connections connections): $(echo "$result" | cut -d' ' -f2-5)"
}

machine_state() {
    printf 'load average %s; other cargo/rustc processes: %s\n' \
        "$(cut -d' ' -f1-3 /proc/loadavg)" "$(pgrep -c -x 'cargo|rustc' || true)"
}

# --- the run ---------------------------------------------------------------
START_STATE="$(machine_state)"
STARTED=$(date +%s)
log "machine at start: $START_STATE"

start_server transaction RECORD_MODE=transaction
# Open every pooled connection and prepare its statements before measuring.
log "warming up"
wrk_run /baseline unique 64 5 "$RUN-warm-up-baseline" >/dev/null
wrk_run /webhooks/stripe unique 64 5 "$RUN-warm-up-first" >/dev/null
for c in $CONNECTIONS; do scenario baseline /baseline unique "$c" start; done
for c in $CONNECTIONS; do
    scenario first /webhooks/stripe unique "$c" transaction
    scenario duplicate /webhooks/stripe fixed "$c" transaction
    # One connection cannot send duplicates at once.
    [ "$c" -lt 2 ] || scenario concurrent /webhooks/stripe "group:$GROUP" "$c" transaction
done

start_server cached RECORD_MODE=transaction RECORD_CACHE_TTL_MS=10000
for c in $CONNECTIONS; do
    scenario duplicate /webhooks/stripe fixed "$c" transaction+cache
    [ "$c" -lt 2 ] || scenario concurrent /webhooks/stripe "group:$GROUP" "$c" transaction+cache
done

start_server lease RECORD_MODE=lease
wrk_run /webhooks/stripe unique 64 5 "$RUN-warm-up-lease" >/dev/null
for c in $CONNECTIONS; do
    scenario first /webhooks/stripe unique "$c" lease
    scenario duplicate /webhooks/stripe fixed "$c" lease
done
for c in $CONNECTIONS; do scenario baseline /baseline unique "$c" end; done
stop_server

# No event may have run twice: one ledger row per distinct Stripe event.
EXACTLY_ONCE="$(psql "$SCHEMA_URL" -qAtc \
    "SELECT count(*) || ' ledger rows for ' || count(DISTINCT event_id) || ' distinct events'
     FROM ledger_entries WHERE source = 'stripe'")"
END_STATE="$(machine_state)"

# --- the report ------------------------------------------------------------
echo
echo "tower-idempotency benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(($(date +%s) - STARTED)) s"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr);" \
    "Postgres $(psql "$DATABASE_URL" -qAtc 'SHOW server_version'), synchronous_commit=$(psql "$DATABASE_URL" -qAtc 'SHOW synchronous_commit')"
if [ -n "${BENCH_BINARY:-}" ]; then
    echo "receiver: $BINARY"
else
    echo "receiver: $BINARY (built from $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes'))"
fi
echo "load: wrk -t$THREADS, ${DURATION}s per scenario after ${WARMUP}s of warm-up; receiver pool 32 connections"
echo "machine at start: $START_STATE"
echo "machine at end:   $END_STATE"
echo
awk -v group="$GROUP" '
function field(name,   i, kv) {
    for (i = 4; i <= NF; i++) { split($i, kv, "="); if (kv[1] == name) return kv[2] }
    return 0
}
{
    n++
    label[n] = $1; config[n] = $2; conns[n] = $3
    rps[n] = field("requests") / (field("duration_us") / 1e6)
    p50[n] = field("p50_us") / 1000; p99[n] = field("p99_us") / 1000
    bad[n] = field("non2xx") + field("socket_errors")
    reqs[n] = field("requests"); wrk_ms[n] = field("wrk_cpu_ms")
    rcv[n] = field("receiver_cpu_us"); pgc[n] = field("postgres_cpu_us"); busy[n] = field("busy_cpu_us")
    out[n] = $NF; sub(/^outcomes:/, "", out[n])
    if ($1 == "baseline") { b_rps[$3] += rps[n]; b_p50[$3] += p50[n]; b_p99[$3] += p99[n]; b_n[$3]++
                            if ($2 == "start") first_b[$3] = rps[n]; else last_b[$3] = rps[n] }
}
END {
    printf "%-11s %-18s %5s %9s %7s %8s %6s %8s %6s %7s  %s\n",
        "scenario", "mode", "conns", "req/s", "x base", "p50 ms", "x base", "p99 ms", "x base", "errors", "layer outcomes"
    for (i = 1; i <= n; i++) {
        c = conns[i]; br = b_rps[c] / b_n[c]; b50 = b_p50[c] / b_n[c]; b99 = b_p99[c] / b_n[c]
        printf "%-11s %-18s %5d %9.0f %7.2f %8.2f %6.2f %8.2f %6.2f %7d  %s\n",
            label[i], config[i], c, rps[i], rps[i] / br, p50[i], p50[i] / b50, p99[i], p99[i] / b99, bad[i], out[i]
    }
    print ""
    print "CPU per request, microseconds (2 cores = 2 CPU-seconds each second; \"other\" is every process not"
    print "in this benchmark, kernel work not charged to a process included: the noise from other work)"
    printf "%-11s %-18s %5s %9s %9s %9s %9s %9s\n", "scenario", "mode", "conns", "wrk", "receiver", "Postgres", "other", "total"
    for (i = 1; i <= n; i++) {
        r = reqs[i]
        w = wrk_ms[i] * 1000 / r; rc = rcv[i] / r; pg = pgc[i] / r; tot = busy[i] / r
        printf "%-11s %-18s %5d %9.1f %9.1f %9.1f %9.1f %9.1f\n", label[i], config[i], conns[i], w, rc, pg, tot - w - rc - pg, tot
    }
    print ""
    for (c in b_n) if (b_n[c] == 2)
        printf "noise: baseline at %d connections %.0f req/s at the start, %.0f at the end (%+.1f%%); ratios use their mean\n",
            c, first_b[c], last_b[c], 100 * (last_b[c] - first_b[c]) / first_b[c]
    printf "concurrent: each new event is sent %d times at once; errors = non-2xx responses + socket errors\n", group
}' "$RESULTS"
echo "exactly once: $EXACTLY_ONCE"
echo "statements and round trips per request: cargo test --test round_trips -- --nocapture"
