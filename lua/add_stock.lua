-- add_stock.lua: an operator adds coupons to a venue's line of a round that has not
-- closed (scheduled, open or paused), refused when the campaign's stock would cost more
-- than its budget.
--
-- Runs on stock shard 0, which holds the document and the overrides: the added units
-- go to shard 0's stock (the refill moves them to other shards when theirs run dry).
-- The budget check counts every round's stock as loaded from the file (the document)
-- plus every earlier addition (the campaign hash's added:<R>:<V> overrides), in the same
-- script that adds, so two additions can never both pass on the same headroom.
--
-- KEYS
--   1 round hash        cpn:{C}:round:<R>    (fields o, c)
--   2 campaign hash     cpn:{C}:campaign     (doc; added:<R>:<V> overrides, rev)
--   3 stock hash        cpn:{C}:stock        (field <R>:<V>)
--   4 stats hash        cpn:{C}:stats        (fields initial:<R>:<V>, added:<R>:<V>)
--   5 event stream      cpn:{C}:events
-- ARGV
--   1 round id
--   2 venue id
--   3 units to add (positive integer)
--   4 operator (the credential's name)
--   5 reason
--   6 pub/sub channel told 'restock <R>:<V>' (workers drop their sold-out flag)
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 ADDED               {0, now, event id, before json, after json}
--   1 ROUND_NOT_FOUND     {1, now}
--   2 VENUE_NOT_FOUND     {2, now}
--   3 ROUND_CLOSED        {3, now, closes_at_ms}
--   4 OVER_BUDGET         {4, now, committed_fen, budget_fen}
--   5 BAD_ARGUMENT        {5, now, message}
--
-- Every check runs before the first write, so a refusal changes nothing.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local round_id, venue_id, units_s = ARGV[1], ARGV[2], ARGV[3]
local actor, reason, channel = ARGV[4], ARGV[5], ARGV[6]
if type(units_s) ~= 'string' or not string.match(units_s, '^[0-9]+$') or #units_s > 10 then
  return {5, now, 'units must be a positive integer'}
end
local units = tonumber(units_s)
if units < 1 then
  return {5, now, 'units must be a positive integer'}
end

local r = redis.call('HMGET', KEYS[1], 'o', 'c')
if not r[1] then
  return {1, now}
end
local line = round_id .. ':' .. venue_id
local remaining = redis.call('HGET', KEYS[3], line)
if not remaining then
  return {2, now}
end
local closes = tonumber(r[2])
if now >= closes then
  return {3, now, closes}
end

local doc, added_total, added_here = nil, 0, 0
local h = redis.call('HGETALL', KEYS[2])
for i = 1, #h, 2 do
  local f = h[i]
  if f == 'doc' then
    doc = cjson.decode(h[i + 1])
  elseif string.sub(f, 1, 6) == 'added:' then
    added_total = added_total + tonumber(h[i + 1])
    if f == 'added:' .. line then
      added_here = tonumber(h[i + 1])
    end
  end
end
if not doc then
  return {5, now, 'no campaign document'}
end
local file_total, file_line = 0, 0
for _, rd in ipairs(doc.rounds) do
  for v, n in pairs(rd.stock) do
    file_total = file_total + n
    if rd.id == round_id and v == venue_id then
      file_line = n
    end
  end
end
local committed = (file_total + added_total + units) * doc.settlement_fen
if committed > doc.budget_fen then
  return {4, now, committed, doc.budget_fen}
end

local left = redis.call('HINCRBY', KEYS[3], line, units)
redis.call('HINCRBY', KEYS[4], 'initial:' .. line, units)
redis.call('HINCRBY', KEYS[4], 'added:' .. line, units)
redis.call('HINCRBY', KEYS[2], 'added:' .. line, units)
redis.call('HINCRBY', KEYS[2], 'rev', 1)
local before = cjson.encode({stock = file_line + added_here, added = added_here,
  remaining_shard0 = left - units})
local after = cjson.encode({stock = file_line + added_here + units,
  added = added_here + units, remaining_shard0 = left})
local id = redis.call('XADD', KEYS[5], '*', 'type', 'add_stock', 'round', round_id,
  'venue', venue_id, 'units', units, 'actor', actor, 'reason', reason, 'at', now,
  'before', before, 'after', after)
redis.call('PUBLISH', channel, 'restock ' .. line)
return {0, now, id, before, after}
