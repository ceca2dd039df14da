-- xfer_out.lua: a donor shard gives part of one stock line to a dry shard (step 1 of 2).
--
-- The transfer is journaled here, in the donor's slot, under its id before
-- anything else can happen to it: until step 2 (xfer_in.lua on the receiving
-- shard) is known done and the entry deleted, the units are counted as in
-- flight, never lost (a sweeper finishes entries left behind by a crash).
--
-- KEYS
--   1 stock hash        cpn:{C:s}:stock      (field <R>:<V> -> remaining, the donor's share)
--   2 transfer journal  cpn:{C:s}:xfer_out   (field <id> -> '<to>|<R>:<V>|<n>|<ms>')
--   3 stats hash        cpn:{C:s}:stats      (field xfer_out:<R>:<V>)
-- ARGV
--   1 stock line '<round>:<venue>'
--   2 transfer id (unique; reusing one returns the first transfer's units)
--   3 receiving shard number
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 MOVED               {0, now, units}  units > 0 left this shard, journaled under the id
--   1 EMPTY               {1, now}         the donor has nothing to give; nothing written
--   2 LINE_NOT_FOUND      {2, now}         no such stock line in this shard; nothing written
--   3 BAD_ARGUMENT        {3, now, message}
--
-- The donor gives half of what it holds, rounded up: a dry shard asking again
-- and again halves the others instead of draining one, so the number of
-- transfers per line stays near S * log2(stock).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local line, id, to = ARGV[1], ARGV[2], ARGV[3]
if not id or id == '' or string.find(id, '|', 1, true) then
  return {3, now, 'transfer id must be non-empty and hold no |'}
end
if not to or not string.match(to, '^[0-9]+$') then
  return {3, now, 'receiving shard must be a number'}
end

local prior = redis.call('HGET', KEYS[2], id)
if prior then
  local units = string.match(prior, '^[^|]*|[^|]*|([0-9]+)|')
  return {0, now, tonumber(units)}
end
local remaining = redis.call('HGET', KEYS[1], line)
if not remaining then
  return {2, now}
end
remaining = tonumber(remaining)
if remaining <= 0 then
  return {1, now}
end
local units = math.floor((remaining + 1) / 2)
redis.call('HINCRBY', KEYS[1], line, -units)
redis.call('HINCRBY', KEYS[3], 'xfer_out:' .. line, units)
redis.call('HSET', KEYS[2], id, to .. '|' .. line .. '|' .. units .. '|' .. now)
return {0, now, units}
