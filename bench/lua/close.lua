-- POST /v1/sms-conversations/{id}/close over the ids in BENCH_IDS (one a line), each thread taking
-- every n-th; once a thread runs out it starts over, and `wrapped` counts those (already-closed) calls.
package.path = os.getenv("BENCH_LUA_DIR") .. "/?.lua;" .. package.path
require "report"

local key = os.getenv("BENCH_KEY") or "none"
local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }
local ids = nil
local index = 0
wrapped = 0

function init(args)
  ids = {}
  local n = tonumber(os.getenv("BENCH_THREADS") or "1")
  local i = 0
  for line in io.lines(os.getenv("BENCH_IDS")) do
    if i % n == (tid or 0) then table.insert(ids, line) end
    i = i + 1
  end
end

function request()
  index = index + 1
  if index > #ids then
    wrapped = wrapped + 1
  end
  local id = ids[((index - 1) % #ids) + 1]
  return wrk.format("POST", "/v1/sms-conversations/" .. id .. "/close", headers, '{"reason":"customer_resolved"}')
end
