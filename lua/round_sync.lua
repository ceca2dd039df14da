-- round_sync.lua: make another stock shard's copy of a round (shards 1..S-1) say what
-- shard 0's says about an operator's pause and early close. Shard 0's pause.lua,
-- resume.lua and close.lua decide; the caller copies their outcome here, and pauses the
-- other shards tentatively before shard 0 decides, so that no shard grants past the
-- instant shard 0 records.
--
-- A close only ever moves the shard's close earlier (never reopens a round).
--
-- KEYS
--   1 round hash        cpn:{C:s}:round:<R>    (fields o, c, p)
--   2 campaign hash     cpn:{C:s}:campaign     (field closed:<R>, which void.lua reads)
-- ARGV
--   1 round id
--   2 paused: '' not paused, '*' paused from this shard's now, else paused since (ms)
--   3 closed: '' no early close, else the close (ms)
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 SYNCED              {0, now}
--   1 ROUND_NOT_FOUND     {1, now}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local round_id, paused, closed = ARGV[1], ARGV[2], ARGV[3]

local r = redis.call('HMGET', KEYS[1], 'o', 'c')
if not r[1] then
  return {1, now}
end
if paused == '' then
  redis.call('HDEL', KEYS[1], 'p')
elseif paused == '*' then
  redis.call('HSET', KEYS[1], 'p', now)
else
  redis.call('HSET', KEYS[1], 'p', paused)
end
if closed ~= '' then
  local closes = tonumber(r[2])
  if tonumber(closed) < closes then
    closes = tonumber(closed)
  end
  local opens = tonumber(r[1])
  if closes < opens then
    opens = closes
  end
  redis.call('HSET', KEYS[1], 'o', opens, 'c', closes)
  redis.call('HSET', KEYS[2], 'closed:' .. round_id, closes)
end
return {0, now}
