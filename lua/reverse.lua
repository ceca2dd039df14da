-- reverse.lua: an operator undoes a mistaken redemption; the coupon is issued again,
-- with its validity unchanged, and can be redeemed once more at its venue.
--
-- Refused once the code is marked settled (mark_settled.lua: `settle` paid it), so money
-- already paid is never left without its redemption. The caller reads the coupon's venue
-- first (its redemption set is a key of this call); a venue that differs means the
-- caller's read is not this coupon's and nothing is written.
--
-- KEYS
--   1 coupon hash       cpn:{C}:coupon:<code>     (status, redeemed_at, settled)
--   2 stats hash        cpn:{C}:stats             (redeemed:<R>:<V> -1, reversed:<R>:<V> +1)
--   3 venue redemptions cpn:{C}:vredeemed:<V>     (V = the coupon's venue)
--   4 event stream      cpn:{C}:events
-- ARGV
--   1 coupon code (canonical)
--   2 the coupon's venue id, as the caller read it
--   3 operator (the credential's name)
--   4 reason
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 REVERSED            {0, now, event id, before json, after json, field, value, ...}
--   1 NOT_FOUND           {1, now}
--   2 NOT_REDEEMED        {2, now, status}
--   3 ALREADY_SETTLED     {3, now, settled_at_ms}
--   4 BAD_ARGUMENT        {4, now, message}
--
-- Every check runs before the first write, so a refusal changes nothing.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local code, venue_id, actor, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local c = redis.call('HMGET', KEYS[1], 'venue', 'status', 'redeemed_at', 'round', 'member',
  'settled')
if not c[1] then
  return {1, now}
end
if c[1] ~= venue_id then
  return {4, now, 'the coupon belongs to venue ' .. c[1]}
end
if c[2] ~= 'redeemed' then
  return {2, now, c[2]}
end
if c[6] then
  return {3, now, tonumber(c[6])}
end

local rv = c[4] .. ':' .. venue_id
redis.call('HSET', KEYS[1], 'status', 'issued')
redis.call('HDEL', KEYS[1], 'redeemed_at')
redis.call('HINCRBY', KEYS[2], 'redeemed:' .. rv, -1)
redis.call('HINCRBY', KEYS[2], 'reversed:' .. rv, 1)
redis.call('ZREM', KEYS[3], code)
local before = cjson.encode({status = 'redeemed', redeemed_at_ms = tonumber(c[3])})
local after = cjson.encode({status = 'issued'})
local id = redis.call('XADD', KEYS[4], '*', 'type', 'reverse', 'code', code, 'round', c[4],
  'venue', venue_id, 'member', c[5], 'at', now, 'actor', actor, 'reason', reason,
  'before', before, 'after', after)
local out = {0, now, id, before, after}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
  out[#out + 1] = v
end
return out
