-- game_restock: units an operator added to a live prize's stock (a committed restock), once per
-- restock.
--
-- KEYS[1] {game:G}:state  hash (see game_draw.lua); x:<restock id> -> 1 marks a restock applied
--                         (or counted by the rebuild that wrote the hash)
-- ARGV[1] restock id (game_prize_restocks.id), ARGV[2] the prize's position, ARGV[3] units added
--
-- Returns 'ok' | 'done' (applied before) | 'cold' (no state: the rebuild from PostgreSQL, which
-- counts this restock, restores it; writing here would leave a partial hash that looks warm)

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'cold'
end
if redis.call('HSETNX', KEYS[1], 'x:' .. ARGV[1], 1) == 0 then
  return 'done'
end
local key = 's:' .. ARGV[2]
if tonumber(redis.call('HGET', KEYS[1], key) or '-1') >= 0 then
  redis.call('HINCRBY', KEYS[1], key, tonumber(ARGV[3]))
end
return 'ok'
