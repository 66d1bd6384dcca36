-- POST /v1/sms-conversations with the seed body. BENCH_PAIR=unique gives every request its own
-- toNumber (no supersede); BENCH_PAIR=fixed reuses one pair (every create supersedes the last).
package.path = os.getenv("BENCH_LUA_DIR") .. "/?.lua;" .. package.path
require "report"

local key = os.getenv("BENCH_KEY") or "none"
local mode = os.getenv("BENCH_PAIR") or "unique"
local run = tonumber(os.getenv("BENCH_RUN") or "0") % 10
local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }
local counter = 0
local template = '{"agentSlug":"recall-sms","toNumber":"%s","fromNumber":"+15555550123",' ..
  '"welcomeMessage":"Hi Ada, this is PAM Motors following up on your service recall.",' ..
  '"dynamicVariables":{"customerName":"Ada","dealershipName":"PAM Motors","recallId":"24V-123"}}'

function request()
  counter = counter + 1
  local to = "+15555550199"
  if mode == "unique" then
    to = string.format("+1555%d%d%05d", run, (tid or 0) % 10, counter % 100000)
  end
  return wrk.format("POST", "/v1/sms-conversations", headers, string.format(template, to))
end
