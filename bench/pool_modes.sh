#!/usr/bin/env bash
# What a transaction-mode pooler costs: unnamed statements instead of
# prepared ones, and PgBouncer's hop. One run, one load generator (wrk, with
# bench/wrk.lua as bench/run.sh drives it), the example receiver:
#
#   bash bench/pool_modes.sh
#
# Three configurations of the receiver:
#   direct      session       straight to Postgres, DATABASE_POOL_MODE=session:
#                             the request path's statements prepared once per
#                             connection (the reference)
#   direct      transaction   straight to Postgres, DATABASE_POOL_MODE=transaction:
#                             every statement unnamed, with its parameter types
#   pgbouncer   transaction   through a PgBouncer in transaction mode that this
#                             script starts (.ci/pgbouncer.sh), DATABASE_POOL_MODE=transaction
# each measured, at each of BENCH_CONNECTIONS, in:
#   baseline    POST /baseline: the Stripe handler's ledger INSERT, no layer
#   first       POST /webhooks/stripe, every request a new event
#   duplicate   POST /webhooks/stripe, one completed event over and over
# Each round runs the three once, in an order rotated from round to round,
# each on a fresh schema owned by a fresh role whose search_path names it
# (PgBouncer refuses the `options` startup parameter, so all three connect
# that way). It prints req/s (mean over the rounds, and their range), p50 and
# p99 latency, each configuration's ratio to direct/session in the same
# scenario (the ratio of the means, and the range of the ratios round by
# round) and CPU per request; checks that every request got the layer outcome
# its scenario expects and that no event ran twice; and drops its roles and
# schemas and stops PgBouncer, however it exits.
#
# Settings (environment): DATABASE_URL [postgres://postgres@127.0.0.1:5432/postgres],
# whose server must let the script's roles in from 127.0.0.1 without a
# password (trust), as the PgBouncer tests need; BENCH_ROUNDS (or ROUNDS) [3];
# BENCH_DURATION seconds per scenario [15]; BENCH_WARMUP seconds before each [2];
# BENCH_CONNECTIONS [16]; BENCH_THREADS wrk threads [2]; BENCH_SKIP_BUILD=1 to
# use the binary already built; BENCH_BINARY=path to measure another build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
ROUNDS="${BENCH_ROUNDS:-${ROUNDS:-3}}"
DURATION="${BENCH_DURATION:-15}"
WARMUP="${BENCH_WARMUP:-2}"
CONNECTIONS="${BENCH_CONNECTIONS:-16}"
THREADS="${BENCH_THREADS:-2}"
RUN="p$(date +%s)"
ROLE_PREFIX="bench_pool_$$"
CONFIGURATIONS=("direct session" "direct transaction" "pgbouncer transaction")
SERVER_PID=""
ROLES=()

log() { printf '%s\n' "$*" >&2; }

# --- tools ---------------------------------------------------------------
need_package() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    [ "$1" != pgbouncer ] || [ ! -x /usr/sbin/pgbouncer ] || return 0
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
need_package pgbouncer pgbouncer

if ! psql -X "$DATABASE_URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then
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
mkdir -p "$TARGET_DIR/bench"
WORK="$(mktemp -d "$TARGET_DIR/bench/pool_modes.XXXXXX")"
RESULTS="$WORK/results"
: >"$RESULTS"

# --- PgBouncer, roles, the server, and cleaning up ---------------------------
# shellcheck source=.ci/pgbouncer.sh
. .ci/pgbouncer.sh

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
drop_role() { # name: its sessions (PgBouncer's server connections among them), its schema, the role
    psql -X "$DATABASE_URL" -q >/dev/null 2>&1 <<SQL || true
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '$1';
SET lock_timeout = '10s';
DROP SCHEMA IF EXISTS $1 CASCADE;
DROP OWNED BY $1;
DROP ROLE $1;
SQL
}
cleanup() {
    stop_server
    pgbouncer_stop
    local role
    for role in "${ROLES[@]}"; do drop_role "$role"; done
    [ -z "${WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Where DATABASE_URL's server is, and which database: the roles connect there.
read -r UPSTREAM_HOST UPSTREAM_PORT DATABASE < <(psql -X "$DATABASE_URL" -Atc \
    "SELECT coalesce(host(inet_server_addr()), '127.0.0.1'), coalesce(inet_server_port(), 5432), current_database()" |
    tr '|' ' ')
pgbouncer_start "$DATABASE_URL"
log "PgBouncer (transaction mode) on 127.0.0.1:$PGBOUNCER_PORT"

create_role() { # name: a role owning a schema of that name, its search_path
    ROLES+=("$1")
    psql -X "$DATABASE_URL" -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE ROLE $1 LOGIN;
CREATE SCHEMA $1 AUTHORIZATION $1;
ALTER ROLE $1 SET search_path = $1;
SQL
}

ADDRESS=""
start_server() { # label database-url pool-mode
    local label="$1"
    stop_server
    : >"$WORK/$label.out"
    : >"$WORK/$label.err"
    env BIND=127.0.0.1:0 DATABASE_URL="$2" DATABASE_POOL_MODE="$3" RECORD_MODE=transaction \
        "$BINARY" >"$WORK/$label.out" 2>"$WORK/$label.err" &
    SERVER_PID=$!
    ADDRESS=""
    for _ in $(seq 300); do
        ADDRESS="$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$WORK/$label.out" || true)"
        [ -n "$ADDRESS" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/$label.err" >&2; exit 1; }
        sleep 0.1
    done
    [ -n "$ADDRESS" ] || { log "the receiver did not start"; cat "$WORK/$label.err" >&2; exit 1; }
}

# --- load ------------------------------------------------------------------
wrk_run() { # path keys connections seconds run-id; prints wrk's RESULT line
    local threads=$((THREADS < $3 ? THREADS : $3))
    BENCH_PATH="$1" BENCH_KEYS="$2" BENCH_RUN="$5" \
        wrk -t"$threads" -c"$3" -d"$4s" --timeout 10s -s bench/wrk.lua "http://$ADDRESS" 2>&1 |
        grep '^RESULT' || { log "wrk failed"; exit 1; }
}

TICK_US=$((1000000 / $(getconf CLK_TCK)))
cpu_snapshot() { # file: busy CPU ticks, one "what ticks" a line: the receiver, each Postgres process, PgBouncer, the machine
    {
        awk '{ print "receiver", $14 + $15 }' "/proc/$SERVER_PID/stat"
        # Other work's Postgres sessions start and end meanwhile: each
        # process is compared with itself.
        awk '$2 == "(postgres)" { print "postgres:" $1, $14 + $15 }' /proc/[0-9]*/stat 2>/dev/null || true
        awk '{ print "pgbouncer", $14 + $15 }' "/proc/$(cat "$PGBOUNCER_DIR/pgbouncer.pid")/stat"
        awk '/^cpu / { print "busy", $2 + $3 + $4 + $7 + $8 }' /proc/stat
    } >"$1"
}
cpu_used() { # before after: microseconds each, a Postgres process that ended meanwhile left out
    awk -v t="$TICK_US" 'NR == FNR { before[$1] = $2; next }
        { group = $1; sub(/:.*/, "", group); used[group] += $2 - before[$1] }
        END { printf "receiver_cpu_us=%d postgres_cpu_us=%d pgbouncer_cpu_us=%d busy_cpu_us=%d",
                  used["receiver"] * t, used["postgres"] * t, used["pgbouncer"] * t, used["busy"] * t }' "$1" "$2"
}

outcomes() { # the layer's outcome counters, one "outcome=count" a line
    curl -fsS "http://$ADDRESS/metrics" |
        sed -n 's/^idempotency_requests_total{.*outcome="\([a-z_]*\)".*} \([0-9.e+]*\)$/\1 \2/p' |
        awk '{ sum[$1] += $2 } END { for (o in sum) printf "%s=%d\n", o, sum[o] }' | sort
}
outcome_diff() { # before after
    awk -F= 'NR == FNR { before[$1] = $2; next } { d = $2 - before[$1]; if (d > 0) { printf "%s%s=%d", sep, $1, d; sep = "," } }' \
        <(printf '%s\n' "$1") <(printf '%s\n' "$2")
}

# round path mode label route keys connections
scenario() {
    local round="$1" path="$2" mode="$3" label="$4" route="$5" keys="$6" connections="$7"
    local id="$RUN-$round-$path-$mode-$label-$connections"
    # The warm-up's events are its own, except the duplicate it completes.
    [ "$keys" != fixed ] || wrk_run "$route" "$keys" 1 1 "$id" >/dev/null
    [ "$WARMUP" -le 0 ] || wrk_run "$route" "$keys" "$connections" "$WARMUP" "$id-warm-up" >/dev/null
    local before after result
    before="$(outcomes)"
    cpu_snapshot "$WORK/cpu.before"
    result="$(wrk_run "$route" "$keys" "$connections" "$DURATION" "$id")"
    cpu_snapshot "$WORK/cpu.after"
    after="$(outcomes)"
    printf '%s %s %s %s %s %s %s outcomes=%s\n' "$round" "$path" "$mode" "$label" "$connections" \
        "${result#RESULT }" "$(cpu_used "$WORK/cpu.before" "$WORK/cpu.after")" "$(outcome_diff "$before" "$after")" >>"$RESULTS"
    log "  $label, $connections connections: $(echo "$result" | cut -d' ' -f2-3,6-8)"
}

measure() { # round path mode
    local round="$1" path="$2" mode="$3"
    local role="${ROLE_PREFIX}_${round}_${path}_${mode}" url
    create_role "$role"
    case "$path" in
        direct) url="postgres://$role@$UPSTREAM_HOST:$UPSTREAM_PORT/$DATABASE?application_name=$role" ;;
        pgbouncer) url="postgres://$role@127.0.0.1:$PGBOUNCER_PORT/$DATABASE?application_name=$role" ;;
    esac
    start_server "$round-$path-$mode" "$url" "$mode"
    log "round $round: $path, pool mode $mode, on $ADDRESS (load average $(cut -d' ' -f1 /proc/loadavg))"
    # Open every pooled connection (and, in session mode, prepare its
    # statements) before measuring.
    wrk_run /baseline unique 64 5 "$RUN-$round-$path-$mode-open-baseline" >/dev/null
    wrk_run /webhooks/stripe unique 64 5 "$RUN-$round-$path-$mode-open-first" >/dev/null
    local c
    for c in $CONNECTIONS; do
        scenario "$round" "$path" "$mode" baseline /baseline unique "$c"
        scenario "$round" "$path" "$mode" first /webhooks/stripe unique "$c"
        scenario "$round" "$path" "$mode" duplicate /webhooks/stripe fixed "$c"
    done
    stop_server
    # No event may have run twice: one ledger row per distinct Stripe event.
    printf '%s %s %s %s\n' "$round" "$path" "$mode" "$(psql -X "$DATABASE_URL" -qAtc \
        "SELECT count(*) || ' ' || count(DISTINCT event_id) FROM $role.ledger_entries WHERE source = 'stripe'")" \
        >>"$WORK/ledger"
    drop_role "$role"
}

machine_state() {
    printf 'load average %s; other cargo/rustc processes: %s\n' \
        "$(cut -d' ' -f1-3 /proc/loadavg)" "$(pgrep -c -x 'cargo|rustc' || true)"
}

# --- the run ---------------------------------------------------------------
START_STATE="$(machine_state)"
STARTED=$(date +%s)
log "machine at start: $START_STATE"
ORDERS=()
for round in $(seq "$ROUNDS"); do
    order=""
    for i in 0 1 2; do
        configuration="${CONFIGURATIONS[$(((i + round - 1) % 3))]}"
        order="$order${order:+, }${configuration/ //}"
        # shellcheck disable=SC2086 # "path mode"
        measure "$round" $configuration
    done
    ORDERS+=("$round: $order")
done
END_STATE="$(machine_state)"

# --- the report ------------------------------------------------------------
echo
echo "tower-idempotency pool modes benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(($(date +%s) - STARTED)) s"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr);" \
    "Postgres $(psql -X "$DATABASE_URL" -qAtc 'SHOW server_version'), synchronous_commit=$(psql -X "$DATABASE_URL" -qAtc 'SHOW synchronous_commit');" \
    "$(/usr/sbin/pgbouncer --version 2>/dev/null | head -n 1 || pgbouncer --version | head -n 1) in transaction mode"
if [ -n "${BENCH_BINARY:-}" ]; then
    echo "receiver: $BINARY"
else
    echo "receiver: $BINARY (built from $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes'))"
fi
echo "load: wrk -t$THREADS, ${DURATION}s per scenario after ${WARMUP}s of warm-up; rounds: $ROUNDS; receiver pool 32 connections"
printf 'order, round by round: %s\n' "$(printf '%s; ' "${ORDERS[@]}" | sed 's/; $//')"
echo "machine at start: $START_STATE"
echo "machine at end:   $END_STATE"
echo
CONFIGURATION_LIST="$(printf '%s\n' "${CONFIGURATIONS[@]}" | tr ' \n' '/ ')"
awk -v connections="$CONNECTIONS" -v configurations="$CONFIGURATION_LIST" '
function field(name,   i, kv) {
    for (i = 6; i <= NF; i++) { split($i, kv, "="); if (kv[1] == name) return kv[2] }
    return 0
}
function range(lo, hi, format) { return sprintf("(" format "-" format ")", lo, hi) }
{
    key = $4 SUBSEP $5 SUBSEP $2 "/" $3
    rounds[key]++
    rps = field("requests") / (field("duration_us") / 1e6)
    RPS[key, $1] = rps
    p50[key] += field("p50_us") / 1000; p99[key] += field("p99_us") / 1000
    errors[key] += field("non2xx") + field("socket_errors")
    requests[key] += field("requests")
    receiver[key] += field("receiver_cpu_us"); postgres[key] += field("postgres_cpu_us")
    pgbouncer[key] += field("pgbouncer_cpu_us"); busy[key] += field("busy_cpu_us")
    expected = $4 == "first" ? "first" : $4 == "duplicate" ? "replayed" : ""
    outcome = $NF; sub(/^outcomes=/, "", outcome); m = split(outcome, parts, ",")
    for (j = 1; j <= m; j++) {
        split(parts[j], kv, "=")
        if (kv[1] != expected) unexpected = unexpected sprintf("\n  %s %s/%s round %s: %s", $4, $2, $3, $1, parts[j])
    }
    seen_round[$1] = 1
}
END {
    ns = split("baseline first duplicate", scenarios, " ")
    nc = split(connections, conns, " ")
    nf = split(configurations, configs, " ")
    reference = configs[1]
    printf "%-10s %-22s %5s %8s %15s %6s %13s %7s %6s %7s %6s %6s\n", "scenario", "configuration", "conns",
        "req/s", "(min-max)", "x ref", "(per round)", "p50 ms", "x ref", "p99 ms", "x ref", "errors"
    for (s = 1; s <= ns; s++) for (c = 1; c <= nc; c++) for (f = 1; f <= nf; f++) {
        key = scenarios[s] SUBSEP conns[c] SUBSEP configs[f]
        ref = scenarios[s] SUBSEP conns[c] SUBSEP reference
        if (!(key in rounds)) continue
        sum = 0; refsum = 0; lo = -1; hi = 0; rlo = -1; rhi = 0
        for (r in seen_round) {
            if (!((key, r) in RPS) || !((ref, r) in RPS)) continue
            v = RPS[key, r]; w = RPS[ref, r]; sum += v; refsum += w
            if (lo < 0 || v < lo) lo = v
            if (v > hi) hi = v
            if (rlo < 0 || v / w < rlo) rlo = v / w
            if (v / w > rhi) rhi = v / w
        }
        printf "%-10s %-22s %5d %8.0f %15s %6.3f %13s %7.2f %6.2f %7.2f %6.2f %6d\n",
            scenarios[s], configs[f], conns[c], sum / rounds[key], range(lo, hi, "%.0f"), sum / refsum,
            range(rlo, rhi, "%.2f"), p50[key] / rounds[key], (p50[key] / rounds[key]) / (p50[ref] / rounds[ref]),
            p99[key] / rounds[key], (p99[key] / rounds[key]) / (p99[ref] / rounds[ref]), errors[key]
    }
    print ""
    print "CPU per request, microseconds, over all rounds (2 cores = 2 CPU-seconds each second; \"other\" is wrk"
    print "and every process outside the benchmark, kernel work not charged to a process included)"
    printf "%-10s %-22s %5s %9s %9s %9s %9s %9s\n", "scenario", "configuration", "conns", "receiver", "Postgres", "PgBouncer", "other", "total"
    for (s = 1; s <= ns; s++) for (c = 1; c <= nc; c++) for (f = 1; f <= nf; f++) {
        key = scenarios[s] SUBSEP conns[c] SUBSEP configs[f]
        if (!(key in rounds)) continue
        q = requests[key]; rc = receiver[key] / q; pg = postgres[key] / q; pb = pgbouncer[key] / q; tot = busy[key] / q
        printf "%-10s %-22s %5d %9.1f %9.1f %9.1f %9.1f %9.1f\n", scenarios[s], configs[f], conns[c], rc, pg, pb, tot - rc - pg - pb, tot
    }
    print ""
    print "x ref: ratio to " reference " in the same scenario, of the means over rounds; (per round): the range"
    print "of the req/s ratios round by round. errors: non-2xx responses + socket errors."
    if (unexpected == "") print "layer outcomes: every first delivery `first`, every duplicate `replayed`"
    else { print "layer outcomes NOT AS EXPECTED:" unexpected; failed = 1 }
    exit failed
}' "$RESULTS" || OUTCOMES_FAILED=1
awk -v configurations="$CONFIGURATION_LIST" '{ rows[$2 "/" $3] += $4; distinct[$2 "/" $3] += $5; if ($4 != $5) bad = 1 }
END {
    line = "exactly once:"
    nf = split(configurations, configs, " ")
    for (f = 1; f <= nf; f++)
        line = line sprintf("%s %s %d ledger rows for %d distinct events", f > 1 ? ";" : "", configs[f], rows[configs[f]], distinct[configs[f]])
    print line
    if (bad) { print "EXACTLY ONCE VIOLATED"; exit 1 }
}' "$WORK/ledger" || exit 1
[ -z "${OUTCOMES_FAILED:-}" ] || exit 1
