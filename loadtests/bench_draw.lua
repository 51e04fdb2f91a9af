-- wrk: POST the wheel draw, each request as the next shopper of a prepared list.
-- BENCH_SHOPPERS names a file of lines "user_id|access token"; BENCH_PATH is /api/v1/games/<id>/draw.
local shoppers = {}
local path = os.getenv("BENCH_PATH")
local i = 0

function init(args)
  for line in io.lines(os.getenv("BENCH_SHOPPERS")) do
    local uid, jwt = line:match("([^|]+)|([^|]+)")
    shoppers[#shoppers + 1] = {
      ["Authorization"] = "Bearer " .. jwt,
      ["Content-Type"] = "application/json",
      ["X-Bench-User"] = uid,
    }
  end
  i = math.random(#shoppers)
end

function request()
  i = i % #shoppers + 1
  return wrk.format("POST", path, shoppers[i], "{}")
end

function done(summary, latency, requests)
  io.write(string.format("STATUS non2xx=%d errors=%d\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
