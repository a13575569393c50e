-- intake.lua: a wrk script for intake's POST /v1/requests, the second
-- opinion on `qm-loadgen --submit-only` (bench/intake.sh runs both).
--
-- Each request is a one-line access request for an auto-approved role, sent
-- with a helpdesk bearer token and a fresh Idempotency-Key. Like qm-loadgen,
-- request i of a thread goes to person p-(i mod 300 + 1) and to role
-- (i mod 300 + i div 300) mod #roles, so load spreads over people and directory
-- groups; the threads interleave (thread t of T takes i = t, t + T, t + 2T,
-- ...). wrk starts each thread before it sets up the next, so T is passed
-- as the script's argument, after "--" (default 1: the threads then walk
-- nearly the same sequence, which intake accepts, merely less spread).
--
-- Intake refuses a request for a role its subject already holds (409
-- already_held) unless it extends an earlier request (extends_request_id).
-- Given QM_BENCH_HELD, a file of "person item role request-id" lines (as
-- `qm-loadgen --extend --held-file F` writes), a request for a pair listed
-- there extends that request. Intake also refuses a request while the same
-- pair's earlier one is on its way (409 already_pending), so a run should
-- stay under one request per pair (300 x the roles) or see 409s.
--
-- Environment:
--   QM_BENCH_TOKEN  bearer JWT (required), e.g.
--                   build/tools/qm-admin token --sub p-0001 --roles helpdesk
--   QM_BENCH_ROLES  item:role pairs, comma separated (default: the local
--                   catalog's auto-approved access roles, below)
--   QM_BENCH_HELD   the grants file above (optional)
--
-- wrk -t2 -c32 -d15s --latency -s bench/intake.lua http://127.0.0.1:8081 -- 2
--
-- Besides wrk's own report it prints the responses by status and one line
-- "WRKRESULT rps=... p50_ms=... p90_ms=... p99_ms=... max_ms=... non2xx=...
-- socket_errors=..." for scripts.

local PEOPLE = 300
local DEFAULT_ROLES = "figma:viewer,github:read,slack:user,zoom:user,jira:user," ..
                      "confluence:user,datadog:user,1password:user"

local threads = {}
local next_tid = 0

local run_nonce

-- Runs once per thread in the main Lua state: numbers the threads and
-- gives them one nonce, so Idempotency-Keys never repeat across runs.
function setup(thread)
  if next_tid == 0 then
    math.randomseed(os.time())
    run_nonce = string.format("%x%06x", os.time(), math.random(0, 0xffffff))
  end
  thread:set("tid", next_tid)
  thread:set("nonce", run_nonce)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

-- Per thread (each has its own Lua state). statuses and first_failure are
-- globals so that done() can read them with thread:get().
local roles = {}
local held = {} -- "p-0001 figma viewer" -> request id
local counter = 0
local stride = 1
local headers
statuses = {}

function init(args)
  stride = tonumber(args[1] or "1") or 1
  if stride < 1 then stride = 1 end
  local token = os.getenv("QM_BENCH_TOKEN")
  if not token or token == "" then
    io.stderr:write("intake.lua: set QM_BENCH_TOKEN to a helpdesk bearer token\n")
    os.exit(2)
  end
  for item, role in string.gmatch(os.getenv("QM_BENCH_ROLES") or DEFAULT_ROLES,
                                   "([^,:%s]+):([^,:%s]+)") do
    table.insert(roles, { item, role })
  end
  if #roles == 0 then
    io.stderr:write("intake.lua: QM_BENCH_ROLES names no item:role pair\n")
    os.exit(2)
  end
  local path = os.getenv("QM_BENCH_HELD")
  if path and path ~= "" then
    local f = io.open(path, "r")
    if not f then
      io.stderr:write("intake.lua: cannot read QM_BENCH_HELD file ", path, "\n")
      os.exit(2)
    end
    for line in f:lines() do
      local person, item, role, id = string.match(line, "^(%S+) (%S+) (%S+) (%S+)$")
      if id then held[person .. " " .. item .. " " .. role] = id end
    end
    f:close()
  end
  headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Accept"] = "application/json",
  }
end

function request()
  local i = counter * stride + tid
  counter = counter + 1
  local role = roles[(i % PEOPLE + math.floor(i / PEOPLE)) % #roles + 1]
  local person = string.format("p-%04d", i % PEOPLE + 1)
  local ext = held[person .. " " .. role[1] .. " " .. role[2]]
  local body = string.format(
    '{"subject_person_id":"%s","reason":"benchmark",%s' ..
    '"lines":[{"item_id":"%s","role_id":"%s"}]}',
    person, ext and ('"extends_request_id":"' .. ext .. '",') or "", role[1], role[2])
  headers["Idempotency-Key"] = string.format("wrk-%s-%d-%d", nonce, tid, counter)
  return wrk.format("POST", "/v1/requests", headers, body)
end

function response(status, hdrs, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 201 and not first_failure then
    first_failure = status .. " " .. string.sub(body or "", 1, 200)
  end
end

function done(summary, latency, requests)
  local counts, failure = {}, nil
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for code, n in pairs(s) do counts[code] = (counts[code] or 0) + n end
    end
    failure = failure or t:get("first_failure")
  end
  local codes, non2xx, parts = {}, 0, {}
  for code in pairs(counts) do table.insert(codes, code) end
  table.sort(codes)
  for _, code in ipairs(codes) do
    table.insert(parts, string.format("%d x%d", code, counts[code]))
    if code < 200 or code > 299 then non2xx = non2xx + counts[code] end
  end
  io.write("HTTP statuses: ", #parts > 0 and table.concat(parts, ", ") or "(none)", "\n")
  if failure then io.write("first failure: ", failure, "\n") end
  local e = summary.errors
  local socket_errors = e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    "WRKRESULT rps=%.1f p50_ms=%.1f p90_ms=%.1f p99_ms=%.1f max_ms=%.1f non2xx=%d socket_errors=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, non2xx, socket_errors))
end
