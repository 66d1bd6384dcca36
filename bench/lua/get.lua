-- GET BENCH_PATH (one fixed resource) with the key.
package.path = os.getenv("BENCH_LUA_DIR") .. "/?.lua;" .. package.path
require "report"

wrk.method = "GET"
wrk.path = os.getenv("BENCH_PATH")
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")
