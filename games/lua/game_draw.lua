-- game_draw: one draw of a game (wheel spin, scratch card issue, egg smash). Every check a crowd
-- fights over, the weighted pick and the decrements happen here in one atomic step; a draw
-- that is accepted is XADDed to the game's stream. The random value comes from Python.
--
-- KEYS[1] {game:G}:state   hash: type, status, starts_ms, ends_ms, free (per day), total (per
--                          shopper, -1 = none), cost (points per paid draw, 0 = none), policy
--                          ('thanks' | 'redistribute'), pity_after (0 = none), pity_pos, thanks_pos
--                          (-1 = none), version, n; per prize i: id:i, w:i (weight), s:i (stock
--                          left, -1 = unlimited), cap:i (per-shopper wins, 0 = none), k:i ('t' thanks | 'w')
-- KEYS[2] {game:G}:users   hash: U -> draws so far, U:l -> losses in a row, U:w:i -> wins of prize i
-- KEYS[3] {game:G}:day:D   hash for business date D: U:f free draws used, U:p paid draws, U:x extra chances
-- KEYS[4] {game:G}:idem:U:K  "rid\npayload" of this shopper's Idempotency-Key (used when ARGV[8] == '1')
-- KEYS[5] {game:G}:stream  the draw stream
-- ARGV[1] now in ms            ARGV[2] user id        ARGV[3] draw id (reservation id)
-- ARGV[4] random integer in [0, 2^52)                 ARGV[5] 'free' | 'paid'
-- ARGV[6] game type the endpoint serves               ARGV[7] payload prefix: a JSON object without '}'
-- ARGV[8] '1' when the request carried an Idempotency-Key
-- ARGV[9] TTL of the idempotency record, seconds      ARGV[10] TTL of the day hash, seconds
--
-- Returns {'ok', rid, position, pity 0|1, weights version, payload} | {'replay', rid, payload} |
-- {'cold'} | {'not_found'} | {'not_started'} | {'ended'} | {'paused'} | {'no_chances'} |
-- {'limit_exceeded'} | {'no_paid_draws'} | {'sold_out'}

if ARGV[8] == '1' then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local sep = string.find(seen, '\n', 1, true)
    return {'replay', string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)}
  end
end

local g = redis.call('HMGET', KEYS[1], 'type', 'status', 'starts_ms', 'ends_ms', 'free', 'total', 'cost',
  'policy', 'pity_after', 'pity_pos', 'thanks_pos', 'version', 'n')
if not g[1] then
  return {'cold'}
end
if g[1] ~= ARGV[6] or g[2] == 'draft' then
  return {'not_found'}
end
if g[2] == 'ended' then
  return {'ended'}
end
local now = tonumber(ARGV[1])
if now < tonumber(g[3]) then
  return {'not_started'}
end
if now >= tonumber(g[4]) then
  return {'ended'}
end
if g[2] ~= 'active' then
  return {'paused'}
end

local uid = ARGV[2]
local paid = ARGV[5] == 'paid'
local drawn = tonumber(redis.call('HGET', KEYS[2], uid) or '0')
local total = tonumber(g[6])
if total >= 0 and drawn >= total then
  return {'limit_exceeded'}
end
local day = redis.call('HMGET', KEYS[3], uid .. ':f', uid .. ':x')
if paid then
  if tonumber(g[7]) <= 0 then
    return {'no_paid_draws'}
  end
elseif tonumber(day[1] or '0') >= tonumber(g[5]) + tonumber(day[2] or '0') then
  return {'no_chances'}
end

-- The prizes, and which of them this shopper can still get (stock left, under their win cap).
local n = tonumber(g[13])
local names = {}
for i = 0, n - 1 do
  names[#names + 1] = 'w:' .. i
  names[#names + 1] = 's:' .. i
  names[#names + 1] = 'cap:' .. i
  names[#names + 1] = 'k:' .. i
end
local p = redis.call('HMGET', KEYS[1], unpack(names))
local wins_names = {}
for i = 0, n - 1 do
  wins_names[i + 1] = uid .. ':w:' .. i
end
local wins = redis.call('HMGET', KEYS[2], unpack(wins_names))
local weight, stock, kind, eligible = {}, {}, {}, {}
for i = 0, n - 1 do
  weight[i] = tonumber(p[i * 4 + 1])
  stock[i] = tonumber(p[i * 4 + 2])
  local cap = tonumber(p[i * 4 + 3])
  kind[i] = p[i * 4 + 4]
  -- -1 is unlimited; any other count below 1 (none should exist) is out of stock, never unlimited
  eligible[i] = (stock[i] == -1 or stock[i] > 0) and (cap == 0 or tonumber(wins[i + 1] or '0') < cap)
end

local rand = tonumber(ARGV[4])
local chosen, pity = -1, 0
local pity_after, pity_pos = tonumber(g[9]), tonumber(g[10])
local streak = tonumber(redis.call('HGET', KEYS[2], uid .. ':l') or '0')
if pity_after > 0 and streak >= pity_after and eligible[pity_pos] then
  chosen, pity = pity_pos, 1
elseif g[8] == 'redistribute' then
  -- The weight of prizes out of stock is spread over the rest, in proportion to their weights.
  local sum = 0
  for i = 0, n - 1 do
    if eligible[i] then sum = sum + weight[i] end
  end
  if sum > 0 then
    local r = math.fmod(rand, sum)
    for i = 0, n - 1 do
      if eligible[i] then
        if r < weight[i] then chosen = i; break end
        r = r - weight[i]
      end
    end
  end
else
  -- The configured odds stay as published; a prize out of stock falls back to "thanks".
  local sum = 0
  for i = 0, n - 1 do sum = sum + weight[i] end
  local r = math.fmod(rand, sum)
  for i = 0, n - 1 do
    if r < weight[i] then chosen = i; break end
    r = r - weight[i]
  end
  if chosen >= 0 and not eligible[chosen] then
    local thanks = tonumber(g[11])
    chosen = (thanks >= 0 and eligible[thanks]) and thanks or -1
  end
end
if chosen < 0 then
  return {'sold_out'}
end

if stock[chosen] > 0 then
  redis.call('HINCRBY', KEYS[1], 's:' .. chosen, -1)
end
redis.call('HINCRBY', KEYS[2], uid, 1)
if kind[chosen] == 't' then
  redis.call('HINCRBY', KEYS[2], uid .. ':l', 1)
else
  redis.call('HSET', KEYS[2], uid .. ':l', 0)
  redis.call('HINCRBY', KEYS[2], uid .. ':w:' .. chosen, 1)
end
redis.call('HINCRBY', KEYS[3], uid .. (paid and ':p' or ':f'), 1)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[10]))

local payload = ARGV[7] .. ',"pos":' .. chosen .. ',"pity":' .. pity .. ',"paid":' .. (paid and 1 or 0) ..
  ',"v":' .. g[12] .. '}'
redis.call('XADD', KEYS[5], '*', 'rid', ARGV[3], 'uid', uid, 'p', payload)
if ARGV[8] == '1' then
  redis.call('SET', KEYS[4], ARGV[3] .. '\n' .. payload, 'EX', tonumber(ARGV[9]))
end
return {'ok', ARGV[3], chosen, pity, g[12], payload}
