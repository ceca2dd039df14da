-- resume.lua: an operator resumes a paused round; grab.lua grants again at once.
--
-- Runs on stock shard 0; with S > 1 shards the caller then clears the pause in the
-- other shards' copies of the round (round_sync.lua).
--
-- KEYS
--   1 round hash        cpn:{C}:round:<R>   (fields o; p = paused since, ra = last resume)
--   2 event stream      cpn:{C}:events
-- ARGV
--   1 round id
--   2 operator (the credential's name)
--   3 reason
--   4 pub/sub channel told 'resume <R>' (workers drop their cached pause)
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 RESUMED             {0, now, event id, before json, after json}
--   1 ROUND_NOT_FOUND     {1, now}
--   2 ROUND_NOT_PAUSED    {2, now}
--
-- Every check runs before the first write, so a refusal changes nothing.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local round_id, actor, reason, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local r = redis.call('HMGET', KEYS[1], 'o', 'p')
if not r[1] then
  return {1, now}
end
if not r[2] then
  return {2, now}
end

local since = tonumber(r[2])
redis.call('HDEL', KEYS[1], 'p')
redis.call('HSET', KEYS[1], 'ra', now)
local before = cjson.encode({paused = true, paused_at_ms = since})
local after = cjson.encode({paused = false, paused_for_ms = now - since})
local id = redis.call('XADD', KEYS[2], '*', 'type', 'resume', 'round', round_id,
  'actor', actor, 'reason', reason, 'at', now, 'before', before, 'after', after)
redis.call('PUBLISH', channel, 'resume ' .. round_id)
return {0, now, id, before, after}
