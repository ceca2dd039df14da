-- xfer_in.lua: the receiving shard credits a journaled transfer, at most once (step 2 of 2).
--
-- The id is kept in this shard's journal for good: the transferring worker
-- and the sweeper may both deliver the same transfer, and the second delivery
-- must change nothing.
--
-- KEYS
--   1 stock hash        cpn:{C:s}:stock      (field <R>:<V>)
--   2 transfer journal  cpn:{C:s}:xfer_in    (field <id> -> '<from>|<R>:<V>|<n>')
--   3 stats hash        cpn:{C:s}:stats      (field xfer_in:<R>:<V>)
-- ARGV
--   1 stock line '<round>:<venue>'
--   2 transfer id
--   3 units (positive integer)
--   4 donor shard number
--   5 pub/sub channel told that the line has stock again
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 CREDITED            {0, now, remaining}  the units were added to the line
--   1 ALREADY_CREDITED    {1, now}             this id was credited before; nothing written
--   2 BAD_ARGUMENT        {2, now, message}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local line, id, units, from, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not id or id == '' then
  return {2, now, 'transfer id is empty'}
end
if not units or not string.match(units, '^[0-9]+$') or #units > 15 or tonumber(units) < 1 then
  return {2, now, 'units must be a positive integer'}
end
if redis.call('HEXISTS', KEYS[2], id) == 1 then
  return {1, now}
end
if redis.call('HEXISTS', KEYS[1], line) == 0 then
  return {2, now, 'no such stock line in this shard'}
end
local remaining = redis.call('HINCRBY', KEYS[1], line, tonumber(units))
redis.call('HINCRBY', KEYS[3], 'xfer_in:' .. line, tonumber(units))
redis.call('HSET', KEYS[2], id, from .. '|' .. line .. '|' .. units)
redis.call('PUBLISH', channel, 'restock ' .. line)
return {0, now, remaining}
