-- wrk script: PUT a small group body to one of GROUPS grouping keys, chosen at random, so the
-- load spreads over the shards like a fleet of batch jobs would.
-- usage: wrk -s bench/push.lua <url> -- <groups> [path prefix]
local groups, prefix = 100, ""
local body = "# TYPE bench_last_success gauge\nbench_last_success 1\n# TYPE bench_items counter\nbench_items 42\n"

function init(args)
  groups = tonumber(args[1]) or groups
  prefix = args[2] or prefix
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0))
end

function request()
  local i = math.random(0, groups - 1)
  return wrk.format("PUT", prefix .. "/metrics/job/bench/instance/i" .. i, nil, body)
end

function done(summary, latency, requests)
  -- one machine-readable line for bench/compare.py
  io.write(string.format("RESULT requests=%d duration_us=%d errors=%d p50_us=%d p99_us=%d non2xx=%d\n",
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
