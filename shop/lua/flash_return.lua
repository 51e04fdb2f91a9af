-- flash_return: units of a cancelled or refunded flash-sale order go back to the item, once.
--
-- KEYS[1] {fs:E}:item:I     hash (see flash_buy.lua)
-- KEYS[2] {fs:E}:bought:I   hash: user id -> units bought
-- KEYS[3] {fs:E}:returned:I hash: return id -> 1 (this item's returns already applied)
-- ARGV[1] return id (flash_sale_returns.id), ARGV[2] user id, ARGV[3] qty
--
-- Returns 'ok' | 'done' (applied before) | 'cold' (no item state: a rebuild from PostgreSQL,
-- which already counts this return, will restore it)

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'cold'
end
if redis.call('HSETNX', KEYS[3], ARGV[1], 1) == 0 then
  return 'done'
end
-- A retired event's keys expire (settlement): a return applied after that (its after-commit step
-- ran late) must not leave this item's `returned` hash behind for good.
-- (PTTL is -1 for a live event's key; 0 at its last millisecond, when it still exists.)
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= 0 then
  redis.call('PEXPIRE', KEYS[3], math.max(ttl, 1))
end
local qty = tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[1], 'remaining', qty)
if redis.call('HINCRBY', KEYS[2], ARGV[2], -qty) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
return 'ok'
