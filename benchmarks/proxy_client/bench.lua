-- wrk script for benchmarks/proxy_client: POST a demo message, with or without a unique key.
-- wrk -s bench.lua URL -- MODE RUN_ID     MODE: "nokey" or "first" (a new Idempotency-Key per request)
-- done() prints "RESULT {json}": requests, seconds, p50/p99 in microseconds, non-2xx count.

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
   prefix = (args[2] or "run") .. "-" .. id .. "-"
   counter = 0
   bad = 0
end

function request()
   counter = counter + 1
   local headers = {["Content-Type"] = "application/json"}
   if mode == "first" then
      headers["Idempotency-Key"] = prefix .. counter
   end
   return wrk.format("POST", "/v1/messages", headers, body)
end

function response(status, headers, body)
   if status >= 300 then
      bad = bad + 1
   end
end

function done(summary, latency, requests)
   local non2xx = 0
   for _, thread in ipairs(threads) do
      non2xx = non2xx + thread:get("bad")
   end
   io.write(string.format(
      'RESULT {"requests": %d, "seconds": %.3f, "p50_us": %d, "p99_us": %d, "non2xx": %d, "errors": %d}\n',
      summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), non2xx,
      summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
