-- wrk script for the relay-idem benchmark harness.
--
-- Invoked as: wrk -s request.lua URL -- MODE RUN_ID BURST TALLY
--   MODE   - "first" (unique Idempotency-Key per request), "replay" (one fixed key),
--            "nokey" (no header) or "storm" (BURST consecutive requests share a key)
--   RUN_ID - unique per wrk invocation; keys are RUN_ID-THREAD-COUNTER, so they never
--            repeat across threads or runs
--   BURST  - storm only: how many requests share one key
--   TALLY  - "1" to count responses by status class (defines response(), which makes
--            wrk parse every response; "0" leaves it undefined)
-- done() prints one line "BENCH_RESULT {json}" that benchmarks/load/wrk.py parses.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   table.insert(threads, thread)
   next_id = next_id + 1
end

local body = '{"to": "+5511999998888", "template": "lembrete_consulta", "language": "pt_BR", '
   .. '"variables": {"1": "João Silva"}}'

function init(args)
   mode = args[1] or "nokey"
   run_id = args[2] or "run"
   burst = tonumber(args[3]) or 32
   counter = 0
   s2xx, s3xx, s409, s4xx, s5xx = 0, 0, 0, 0, 0
   prefix = run_id .. "-" .. id .. "-"
   if args[4] ~= "1" then
      response = nil
   end
end

function request()
   counter = counter + 1
   local headers = {["Content-Type"] = "application/json"}
   if mode == "first" then
      headers["Idempotency-Key"] = prefix .. counter
   elseif mode == "replay" then
      headers["Idempotency-Key"] = run_id .. "-replay"
   elseif mode == "storm" then
      headers["Idempotency-Key"] = prefix .. "s" .. math.floor((counter - 1) / burst)
   end
   return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
   if status < 300 then
      s2xx = s2xx + 1
   elseif status < 400 then
      s3xx = s3xx + 1
   elseif status == 409 then
      s409 = s409 + 1
   elseif status < 500 then
      s4xx = s4xx + 1
   else
      s5xx = s5xx + 1
   end
end

function done(summary, latency, requests)
   local sent, c2, c3, c409, c4, c5 = 0, 0, 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      sent = sent + (thread:get("counter") or 0)
      c2 = c2 + (thread:get("s2xx") or 0)
      c3 = c3 + (thread:get("s3xx") or 0)
      c409 = c409 + (thread:get("s409") or 0)
      c4 = c4 + (thread:get("s4xx") or 0)
      c5 = c5 + (thread:get("s5xx") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "sent": %d, '
         .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"status": {"2xx": %d, "3xx": %d, "409": %d, "4xx": %d, "5xx": %d}}\n',
      summary.requests, summary.duration, sent,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
      e.connect, e.read, e.write, e.status, e.timeout,
      c2, c3, c409, c4, c5))
end
