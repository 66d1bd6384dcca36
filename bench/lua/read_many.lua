-- GET /v1/sms-conversations/{id}{BENCH_SUFFIX} over random ids from BENCH_IDS (one a line).
package.path = os.getenv("BENCH_LUA_DIR") .. "/?.lua;" .. package.path
require "report"

local key = os.getenv("BENCH_KEY") or "none"
local suffix = os.getenv("BENCH_SUFFIX") or ""
local headers = { ["Authorization"] = "Bearer " .. key }
local ids = nil

function init(args)
  ids = {}
  for line in io.lines(os.getenv("BENCH_IDS")) do
    table.insert(ids, line)
  end
  math.randomseed(os.time() + (tid or 0))
end

function request()
  local id = ids[math.random(#ids)]
  return wrk.format("GET", "/v1/sms-conversations/" .. id .. suffix, headers)
end
