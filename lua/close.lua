-- close.lua: an operator closes a round now; grab.lua grants nothing from this instant.
--
-- The round's close becomes now (a round that had not opened yet opens and closes now:
-- it is cancelled). Coupons already issued keep their validity. The campaign hash
-- records the close as an operator override (closed:<R>), apart from the document the
-- campaign file loaded, so reloading that file neither is refused nor undoes it, and
-- void.lua stops returning stock to the round from now on.
--
-- KEYS
--   1 round hash        cpn:{C}:round:<R>    (fields o, c, p)
--   2 campaign hash     cpn:{C}:campaign     (fields closed:<R>, rev)
--   3 event stream      cpn:{C}:events
-- ARGV
--   1 round id
--   2 operator (the credential's name)
--   3 reason
--   4 pub/sub channel told 'close <R>' (workers reload the campaign at once)
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 CLOSED              {0, now, event id, before json, after json}
--   1 ROUND_NOT_FOUND     {1, now}
--   2 ROUND_CLOSED        {2, now, closes_at_ms}
--
-- Every check runs before the first write, so a refusal changes nothing.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local round_id, actor, reason, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local r = redis.call('HMGET', KEYS[1], 'o', 'c', 'p')
if not r[1] then
  return {1, now}
end
local opens, closes = tonumber(r[1]), tonumber(r[2])
if now >= closes then
  return {2, now, closes}
end

local new_opens = opens
if now < opens then
  new_opens = now
end
redis.call('HSET', KEYS[1], 'o', new_opens, 'c', now)
redis.call('HDEL', KEYS[1], 'p')
redis.call('HSET', KEYS[2], 'closed:' .. round_id, now)
redis.call('HINCRBY', KEYS[2], 'rev', 1)
local before = cjson.encode({opens_at_ms = opens, closes_at_ms = closes,
  paused = r[3] ~= false})
local after = cjson.encode({opens_at_ms = new_opens, closes_at_ms = now, paused = false})
local id = redis.call('XADD', KEYS[3], '*', 'type', 'close', 'round', round_id,
  'actor', actor, 'reason', reason, 'at', now, 'before', before, 'after', after)
redis.call('PUBLISH', channel, 'close ' .. round_id)
return {0, now, id, before, after}
