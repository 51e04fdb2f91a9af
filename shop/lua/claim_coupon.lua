-- claim_coupon: one shopper claims one unit of a public coupon template, all checks and the
-- decrement in one atomic step; a winner's reservation is XADDed to the template's stream.
--
-- KEYS[1] {cpn:T}:state   hash: status, starts_ms, ends_ms (0 = open), total (-1 = unlimited),
--                         claimed, per_user_limit, public ('1'/'0')
-- KEYS[2] {cpn:T}:users   hash: user id -> public claims so far
-- KEYS[3] {cpn:T}:idem:U:K  string "rid\npayload" of this shopper's Idempotency-Key (used only when ARGV[5] == '1')
-- KEYS[4] {cpn:T}:stream  the reservation stream
-- ARGV[1] now in ms (from Python: scripts stay deterministic)
-- ARGV[2] user id
-- ARGV[3] reservation id (the coupon's code)
-- ARGV[4] payload JSON for the stream entry
-- ARGV[5] '1' when the request carried an Idempotency-Key
-- ARGV[6] TTL of the idempotency record, seconds
--
-- Returns {'ok', rid, entry id} | {'replay', rid, payload} | {'cold'} (no state: Redis lost it) |
-- {'not_found'} | {'not_started'} | {'ended'} | {'paused'} | {'sold_out'} | {'limit_exceeded'}

if ARGV[5] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, '\n', 1, true)
    return {'replay', string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)}
  end
end

local f = redis.call('HMGET', KEYS[1], 'status', 'starts_ms', 'ends_ms', 'total', 'claimed', 'per_user_limit', 'public')
if not f[1] then
  return {'cold'}
end
if f[7] ~= '1' or f[1] == 'draft' then
  return {'not_found'}
end
if f[1] == 'ended' then
  return {'ended'}
end
local now = tonumber(ARGV[1])
local starts, ends = tonumber(f[2]), tonumber(f[3])
if starts > 0 and now < starts then
  return {'not_started'}
end
if ends > 0 and now >= ends then
  return {'ended'}
end
if f[1] ~= 'active' then
  return {'paused'}
end
local total, claimed = tonumber(f[4]), tonumber(f[5])
if total >= 0 and claimed >= total then
  return {'sold_out'}
end
local mine = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if mine >= tonumber(f[6]) then
  return {'limit_exceeded'}
end

redis.call('HINCRBY', KEYS[1], 'claimed', 1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
local id = redis.call('XADD', KEYS[4], '*', 'rid', ARGV[3], 'uid', ARGV[2], 'p', ARGV[4])
if ARGV[5] == '1' then
  redis.call('SET', KEYS[3], ARGV[3] .. '\n' .. ARGV[4], 'EX', tonumber(ARGV[6]))
end
return {'ok', ARGV[3], id}
