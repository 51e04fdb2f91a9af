-- game_warm: write a game's rules (and, on rebuild, its counters) into Redis from PostgreSQL.
--
-- KEYS[1] {game:G}:state  KEYS[2] {game:G}:users  KEYS[3] {game:G}:day:<today>  KEYS[4] {game:G}:stream
-- ARGV[1] 'config': ARGV[2..] field/value pairs of rules (no counters, no stock); refused with
--         {'cold'} when Redis holds no state (then the caller rebuilds).
-- ARGV[1] 'rebuild', then in this order, all from one PostgreSQL snapshot:
--         S, then S values = state field/value pairs (rules, stock left, and r:<draw id> for
--           each unit given back that the snapshot counts);
--         the last stream id persisted before the snapshot; today's date;
--         U, then U values = users hash pairs (draws, losing streaks, wins);
--         D, then D values = today's day hash pairs (with grant:<id> for each grant counted);
--         the day hash TTL;
--         C, then C reservation ids of entries after that stream id the snapshot already holds.
--         The other entries after that id (draws not in the snapshot) are applied on top, as the
--         draw script applied them (stock, draws, losing streak, wins, today's chances), so a
--         rebuild during a live game never hands out a unit twice, counts a draw twice or
--         loses a shopper's streak towards the pity prize.
-- Returns {'ok'} | {'cold'}

if ARGV[1] == 'config' then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return {'cold'}
  end
  for i = 2, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  return {'ok'}
end

redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
local at = 2
local s = tonumber(ARGV[at]); at = at + 1
for i = at, at + s - 1, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
at = at + s
local last = ARGV[at]; at = at + 1
local today = ARGV[at]; at = at + 1
local u = tonumber(ARGV[at]); at = at + 1
for i = at, at + u - 1, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
at = at + u
local d = tonumber(ARGV[at]); at = at + 1
for i = at, at + d - 1, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
at = at + d
local ttl = tonumber(ARGV[at]); at = at + 1
local c = tonumber(ARGV[at]); at = at + 1
local counted = {}
for i = at, at + c - 1 do
  counted[ARGV[i]] = true
end

local start = last == '0-0' and '-' or '(' .. last
local entries = redis.call('XRANGE', KEYS[4], start, '+')
for _, entry in ipairs(entries) do
  local f = entry[2]
  local rid, uid, p
  for i = 1, #f, 2 do
    if f[i] == 'rid' then rid = f[i + 1] elseif f[i] == 'uid' then uid = f[i + 1] elseif f[i] == 'p' then p = f[i + 1] end
  end
  if uid and p and not counted[rid] then
    local e = cjson.decode(p)
    local pos = tostring(e.pos)
    local left = tonumber(redis.call('HGET', KEYS[1], 's:' .. pos) or '-1')
    if left > 0 then
      redis.call('HINCRBY', KEYS[1], 's:' .. pos, -1)
    end
    redis.call('HINCRBY', KEYS[2], uid, 1)
    if redis.call('HGET', KEYS[1], 'k:' .. pos) == 't' then
      redis.call('HINCRBY', KEYS[2], uid .. ':l', 1)
    else
      redis.call('HSET', KEYS[2], uid .. ':l', 0)
      redis.call('HINCRBY', KEYS[2], uid .. ':w:' .. pos, 1)
    end
    if e.d == today then
      redis.call('HINCRBY', KEYS[3], uid .. (e.paid == 1 and ':p' or ':f'), 1)
    end
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('EXPIRE', KEYS[3], ttl)
end
return {'ok'}
