-- warm_coupon_template: write a template's claim rules into Redis, keeping or rebuilding its counters.
--
-- KEYS[1] {cpn:T}:state   hash (see claim_coupon.lua)
-- KEYS[2] {cpn:T}:users   hash: user id -> public claims
-- KEYS[3] {cpn:T}:stream  the reservation stream
-- ARGV[1] mode: 'config' keeps the live counters (an edit); 'rebuild' sets them from PostgreSQL
-- ARGV[2] status, ARGV[3] starts_ms, ARGV[4] ends_ms, ARGV[5] total (-1 = unlimited),
-- ARGV[6] per_user_limit, ARGV[7] public ('1'/'0')
-- rebuild only: ARGV[8] claims in PostgreSQL, counted after persisting the stream up to entry
-- ARGV[9]; ARGV[10], ARGV[11], ... user id, claims pairs. Stream entries after ARGV[9] are
-- added on top (claims made meanwhile), so a rebuild never lets the counter fall below the truth.
--
-- Returns {'ok', claimed} | {'cold'} (config mode and no state: rebuild instead) |
-- {'below_claimed', claimed} (config mode: the new total is below what is already claimed)

local total = tonumber(ARGV[5])
if ARGV[1] == 'config' then
  local claimed = redis.call('HGET', KEYS[1], 'claimed')
  if not claimed then
    return {'cold'}
  end
  claimed = tonumber(claimed)
  if total >= 0 and total < claimed then
    return {'below_claimed', claimed}
  end
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'starts_ms', ARGV[3], 'ends_ms', ARGV[4], 'total', ARGV[5],
    'per_user_limit', ARGV[6], 'public', ARGV[7])
  return {'ok', claimed}
end

local claimed = tonumber(ARGV[8])
redis.call('DEL', KEYS[2])
for i = 10, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
local tail = redis.call('XRANGE', KEYS[3], '(' .. ARGV[9], '+')
for _, entry in ipairs(tail) do
  local fields = entry[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'uid' then
      redis.call('HINCRBY', KEYS[2], fields[j + 1], 1)
      claimed = claimed + 1
    end
  end
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'starts_ms', ARGV[3], 'ends_ms', ARGV[4], 'total', ARGV[5],
  'per_user_limit', ARGV[6], 'public', ARGV[7], 'claimed', claimed)
return {'ok', claimed}
