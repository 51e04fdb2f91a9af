-- flash_buy: one purchase attempt on one flash-sale item. Idempotency, per-shopper and per-IP rate
-- limits, the window, stock and the per-shopper limit are checked, and a winner's units are
-- decremented and XADDed as a reservation, in one atomic step.
--
-- KEYS[1] {fs:E}:state      hash: status, starts_ms, ends_ms, user_rate, ip_rate
-- KEYS[2] {fs:E}:item:I     hash: remaining, limit (per shopper), price, quota
-- KEYS[3] {fs:E}:bought:I   hash: user id -> units bought (not given back)
-- KEYS[4] {fs:E}:idem:U:K   string "rid\nfingerprint\npayload" (used only when ARGV[6] == '1')
-- KEYS[5] {fs:E}:rate:u:U   attempts of this shopper in the current second
-- KEYS[6] {fs:E}:rate:ip:IP attempts from this client IP in the current second
-- KEYS[7] {fs:E}:stream     the reservation stream
-- KEYS[8] {fs:E}:keyed      set: shoppers holding an idempotency record (an API process that saw
--                           the item sold out answers keyed requests of anyone else from memory)
-- ARGV[1] now in ms (from Python: scripts stay deterministic)
-- ARGV[2] user id
-- ARGV[3] qty
-- ARGV[4] reservation id
-- ARGV[5] payload JSON for the stream entry
-- ARGV[6] '1' when the request carried an Idempotency-Key
-- ARGV[7] TTL of the idempotency record after the sale's end, seconds
-- ARGV[8] fingerprint of the request body (a replay with another body is refused by the caller)
-- ARGV[9] item id (stream field `i`, so a rebuild can count the tail per item)
--
-- Returns {'ok', rid, entry id, remaining} | {'replay', rid, fingerprint, payload} |
-- {'cold'} (no state: Redis lost it) | {'not_found'} | {'not_started'} | {'ended'} |
-- {'rate_limited', ms to wait} | {'sold_out', remaining} | {'limit_exceeded', bought}

if ARGV[6] == '1' then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local a = string.find(seen, '\n', 1, true)
    local b = string.find(seen, '\n', a + 1, true)
    return {'replay', string.sub(seen, 1, a - 1), string.sub(seen, a + 1, b - 1), string.sub(seen, b + 1)}
  end
end

local s = redis.call('HMGET', KEYS[1], 'status', 'starts_ms', 'ends_ms', 'user_rate', 'ip_rate')
if not s[1] then
  return {'cold'}
end

-- Every attempt counts, refused or not: a scalper's burst is cut off before it costs anything.
local n = redis.call('INCR', KEYS[5])
if n == 1 then
  redis.call('PEXPIRE', KEYS[5], 1000)
end
if n > tonumber(s[4]) then
  return {'rate_limited', redis.call('PTTL', KEYS[5])}
end
n = redis.call('INCR', KEYS[6])
if n == 1 then
  redis.call('PEXPIRE', KEYS[6], 1000)
end
if n > tonumber(s[5]) then
  return {'rate_limited', redis.call('PTTL', KEYS[6])}
end

if s[1] == 'draft' then
  return {'not_found'}
end
if s[1] ~= 'published' then
  return {'ended'}
end
local now = tonumber(ARGV[1])
if now < tonumber(s[2]) then
  return {'not_started'}
end
if now >= tonumber(s[3]) then
  return {'ended'}
end

local it = redis.call('HMGET', KEYS[2], 'remaining', 'limit')
if not it[1] then
  return {'not_found'}
end
local remaining, qty = tonumber(it[1]), tonumber(ARGV[3])
if remaining < qty then
  return {'sold_out', remaining}
end
local mine = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
if mine + qty > tonumber(it[2]) then
  return {'limit_exceeded', mine}
end

remaining = redis.call('HINCRBY', KEYS[2], 'remaining', -qty)
redis.call('HINCRBY', KEYS[3], ARGV[2], qty)
local id = redis.call('XADD', KEYS[7], '*', 'rid', ARGV[4], 'uid', ARGV[2], 'p', ARGV[5], 'i', ARGV[9], 'q', ARGV[3])
if ARGV[6] == '1' then
  -- Kept until ARGV[7] seconds after the sale ends: a retry is answered with its order while the
  -- sale lasts and a while after (PostgreSQL keeps the key too: it never makes a second order).
  local ttl = tonumber(ARGV[7]) + math.max(0, math.floor((tonumber(s[3]) - now) / 1000))
  redis.call('SET', KEYS[4], ARGV[4] .. '\n' .. ARGV[8] .. '\n' .. ARGV[5], 'EX', ttl)
  redis.call('SADD', KEYS[8], ARGV[2])
  redis.call('EXPIRE', KEYS[8], ttl)  -- every record of the event expires at the same moment
end
return {'ok', ARGV[4], id, remaining}
