-- game_return: a prize unit given back (an expired scratch card, goods not claimed in time)
-- returns to the prize stock and comes off the shopper's wins of that prize, once per draw.
--
-- KEYS[1] {game:G}:state  hash (see game_draw.lua); r:<draw id> -> 1 marks a return applied
--                         (or counted by the rebuild that wrote the hash)
-- KEYS[2] {game:G}:users  hash (see game_draw.lua)
-- ARGV[1] draw id (game_draws.id), ARGV[2] user id, ARGV[3] the prize's position
--
-- Returns 'ok' | 'done' (applied before) | 'cold' (no state: the rebuild from PostgreSQL, which
-- counts this return, restores it; writing here would leave a partial hash that looks warm)

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'cold'
end
if redis.call('HSETNX', KEYS[1], 'r:' .. ARGV[1], 1) == 0 then
  return 'done'
end
local pos = ARGV[3]
if tonumber(redis.call('HGET', KEYS[1], 's:' .. pos) or '-1') >= 0 then
  redis.call('HINCRBY', KEYS[1], 's:' .. pos, 1)
end
if redis.call('HGET', KEYS[1], 'k:' .. pos) == 'w' then
  local wins = ARGV[2] .. ':w:' .. pos
  if redis.call('HINCRBY', KEYS[2], wins, -1) <= 0 then
    redis.call('HDEL', KEYS[2], wins)
  end
end
return 'ok'
