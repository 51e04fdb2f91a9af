-- flash_warm_item: write one flash-sale item's rules into Redis, adjusting or rebuilding its counters.
--
-- KEYS[1] {fs:E}:item:I     hash: remaining, limit, price, quota
-- KEYS[2] {fs:E}:bought:I   hash: user id -> units bought
-- KEYS[3] {fs:E}:stream     the event's reservation stream
-- KEYS[4] {fs:E}:returned:I hash: return id -> 1 (this item's returns applied)
-- ARGV[1] mode: 'config' moves `remaining` by a quota change (an edit before the start);
--         'remove' deletes the item's keys unless it has sold (an edit before the start);
--         'rebuild' sets the counters from PostgreSQL
-- ARGV[2] config: quota delta | rebuild: remaining in PostgreSQL (quota - sold), counted after
--         persisting the stream up to entry ARGV[6]
-- ARGV[3] per-shopper limit, ARGV[4] flash price, ARGV[5] quota
-- rebuild only: ARGV[6] last persisted stream id, ARGV[7] item id, ARGV[8] number N of return ids
-- that follow (returns PostgreSQL already counts), then N return ids, then a number M and M
-- reservation ids of entries after ARGV[6] that PostgreSQL already counts too, then user id,
-- units pairs. Other stream entries of this item after ARGV[6] are taken on top (sales made
-- meanwhile), so a rebuild never lets `remaining` rise above the truth.
--
-- Returns {'ok', remaining} | {'cold'} (config mode and no state: rebuild instead) |
-- {'below_sold', remaining} (config mode: the quota cannot drop below what is sold) |
-- {'sold', remaining} (remove mode: a purchase got there first; nothing is deleted)

if ARGV[1] == 'config' then
  local remaining = redis.call('HGET', KEYS[1], 'remaining')
  if not remaining then
    return {'cold'}
  end
  remaining = tonumber(remaining) + tonumber(ARGV[2])
  if remaining < 0 then
    return {'below_sold', remaining - tonumber(ARGV[2])}
  end
  redis.call('HSET', KEYS[1], 'remaining', remaining, 'limit', ARGV[3], 'price', ARGV[4], 'quota', ARGV[5])
  return {'ok', remaining}
end

if ARGV[1] == 'remove' then
  -- Atomic with the purchase script: once the keys are gone no purchase of the item can succeed,
  -- and one that succeeded before shows here (an edit that began just before the start).
  local item = redis.call('HMGET', KEYS[1], 'remaining', 'quota')
  if (item[1] and tonumber(item[1]) ~= tonumber(item[2])) or redis.call('EXISTS', KEYS[2]) == 1 then
    return {'sold', tonumber(item[1]) or 0}
  end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
  return {'ok', 0}
end

local remaining = tonumber(ARGV[2])
local n = tonumber(ARGV[8])
-- The item's return markers are the snapshot's: a return applied to the counters this overwrites
-- loses its marker and is applied again by the caller (returns committed after the snapshot).
redis.call('DEL', KEYS[4])
for i = 9, 8 + n do
  redis.call('HSET', KEYS[4], ARGV[i], 1)
end
local m = tonumber(ARGV[9 + n])
local counted = {}
for i = 10 + n, 9 + n + m do
  counted[ARGV[i]] = true
end
redis.call('DEL', KEYS[2])
for i = 10 + n + m, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
local tail = redis.call('XRANGE', KEYS[3], '(' .. ARGV[6], '+')
for _, entry in ipairs(tail) do
  local f = {}
  local fields = entry[2]
  for j = 1, #fields, 2 do
    f[fields[j]] = fields[j + 1]
  end
  if f['i'] == ARGV[7] and not counted[f['rid']] then
    local q = tonumber(f['q'])
    remaining = remaining - q
    redis.call('HINCRBY', KEYS[2], f['uid'], q)
  end
end
redis.call('HSET', KEYS[1], 'remaining', remaining, 'limit', ARGV[3], 'price', ARGV[4], 'quota', ARGV[5])
return {'ok', remaining}
