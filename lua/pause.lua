-- pause.lua: an operator pauses an open round; grab.lua grants nothing while it is paused.
--
-- Runs on stock shard 0 (the campaign-wide event stream); with S > 1 shards the caller
-- pauses the other shards' copies of the round first (round_sync.lua), so once this
-- script has answered no shard grants.
--
-- KEYS
--   1 round hash        cpn:{C}:round:<R>   (fields o, c; p = paused since, pa = last pause)
--   2 event stream      cpn:{C}:events
-- ARGV
--   1 round id
--   2 operator (the credential's name)
--   3 reason
--   4 pub/sub channel told 'pause <R>' (workers may then refuse without Redis)
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 PAUSED              {0, now, event id, before json, after json}
--   1 ROUND_NOT_FOUND     {1, now}
--   2 ROUND_NOT_OPEN      {2, now, opens_at_ms}
--   3 ROUND_CLOSED        {3, now, closes_at_ms}
--   4 ALREADY_PAUSED      {4, now, opens_at_ms}
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
  return {3, now, closes}
end
if now < opens then
  return {2, now, opens}
end
if r[3] then
  return {4, now, opens}
end

redis.call('HSET', KEYS[1], 'p', now, 'pa', now)
local before = cjson.encode({paused = false})
local after = cjson.encode({paused = true, paused_at_ms = now})
local id = redis.call('XADD', KEYS[2], '*', 'type', 'pause', 'round', round_id,
  'actor', actor, 'reason', reason, 'at', now, 'before', before, 'after', after)
redis.call('PUBLISH', channel, 'pause ' .. round_id)
return {0, now, id, before, after}
