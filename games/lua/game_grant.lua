-- game_grant: extra chances a committed grant gives a shopper on its business day, once per grant.
--
-- KEYS[1] {game:G}:state  hash (see game_draw.lua): only whether it exists
-- KEYS[2] {game:G}:day:D  hash for the grant's business date D (see game_draw.lua); grant:<id> -> 1
--                         marks a grant applied (or counted by the rebuild that wrote the hash)
-- ARGV[1] grant id (game_chance_grants.id), ARGV[2] user id, ARGV[3] chances, ARGV[4] day hash TTL
--
-- Returns 'ok' | 'done' (applied before) | 'cold' (no state: the rebuild from PostgreSQL, which
-- counts this grant, restores it)

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'cold'
end
if redis.call('HSETNX', KEYS[2], 'grant:' .. ARGV[1], 1) == 0 then
  return 'done'
end
redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':x', tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return 'ok'
