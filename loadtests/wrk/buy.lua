-- wrk: POST the flash-sale buy call, each request as the next shopper of a prepared list.
-- BENCH_SHOPPERS names a file of lines "user_id|access token|address id|purchase token";
-- BENCH_PATH is the buy path (/api/v1/flash-sales/<sale>/items/<item>/orders).
local shoppers = {}
local path = os.getenv("BENCH_PATH")
local i = 0

function init(args)
  for line in io.lines(os.getenv("BENCH_SHOPPERS")) do
    local uid, jwt, address, token = line:match("([^|]+)|([^|]+)|([^|]+)|([^|]+)")
    shoppers[#shoppers + 1] = {
      headers = {
        ["Authorization"] = "Bearer " .. jwt,
        ["Content-Type"] = "application/json",
        ["X-Bench-User"] = uid,
      },
      body = '{"qty":1,"address_id":' .. address .. ',"token":"' .. token .. '"}',
    }
  end
  -- Threads start at different shoppers.
  i = math.random(#shoppers)
end

function request()
  i = i % #shoppers + 1
  local s = shoppers[i]
  return wrk.format("POST", path, s.headers, s.body)
end

function done(summary, latency, requests)
  io.write(string.format("STATUS non2xx=%d errors=%d\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
