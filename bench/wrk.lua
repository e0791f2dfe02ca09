-- wrk script for bench/run.sh: Stripe-like events, one request body per call,
-- so that every scenario (the baseline included) costs the client the same.
--
-- BENCH_PATH  route to POST to                      [/webhooks/stripe]
-- BENCH_KEYS  unique   every request a new event
--             fixed    every request the event BENCH_RUN-dup
--             group:N  each new event sent N times in a row, concurrently
--                      across the thread's connections
-- BENCH_RUN   a prefix that keeps event ids apart between runs

local path = os.getenv("BENCH_PATH") or "/webhooks/stripe"
local keys = os.getenv("BENCH_KEYS") or "unique"
local run = os.getenv("BENCH_RUN") or "run"
local group = tonumber(string.match(keys, "^group:(%d+)$") or "0")

local threads = 0
function setup(thread)
    thread:set("thread_id", threads)
    threads = threads + 1
end

local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function request()
    counter = counter + 1
    local id
    if keys == "fixed" then
        id = run .. "-dup"
    elseif group > 0 then
        id = string.format("%s-%d-%d", run, thread_id, math.floor((counter - 1) / group))
    else
        id = string.format("%s-%d-%d", run, thread_id, counter)
    end
    local body = '{"id":"evt_' .. id .. '","type":"charge.succeeded","data":{"object":{"amount":500}}}'
    return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
    local errors = summary.errors
    io.write(string.format(
        "RESULT requests=%d duration_us=%d non2xx=%d socket_errors=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
        summary.requests, summary.duration, errors.status,
        errors.connect + errors.read + errors.write + errors.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
