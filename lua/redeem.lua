-- redeem.lua: a venue redeems one coupon, exactly once.
--
-- KEYS
--   1 coupon hash       cpn:{C}:coupon:<code>
--   2 stats hash        cpn:{C}:stats              (field redeemed:<R>:<V>)
--   3 venue redemptions cpn:{C}:vredeemed:<V>      (V = the scanning venue)
--   4 event stream      cpn:{C}:events
-- ARGV
--   1 scanning venue id
--   2 coupon code (canonical)
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 REDEEMED            {0, now, field, value, ...}  the coupon hash after the change
--   1 NOT_FOUND           {1, now}
--   2 WRONG_VENUE         {2, now}
--   3 ALREADY_REDEEMED    {3, now, redeemed_at_ms}
--   4 VOID                {4, now}
--   5 NOT_YET_VALID       {5, now, valid_from_ms}
--   6 EXPIRED             {6, now, valid_until_ms}
--
-- The venue is checked before the status, so a scanner of another venue
-- learns nothing about a coupon that is not its own.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local venue_id, code = ARGV[1], ARGV[2]

local c = redis.call('HMGET', KEYS[1], 'venue', 'status', 'redeemed_at', 'valid_from',
  'valid_until', 'round', 'member')
if not c[1] then
  return {1, now}
end
if c[1] ~= venue_id then
  return {2, now}
end
if c[2] == 'redeemed' then
  return {3, now, tonumber(c[3])}
end
if c[2] == 'void' then
  return {4, now}
end
if now < tonumber(c[4]) then
  return {5, now, tonumber(c[4])}
end
if now > tonumber(c[5]) then
  return {6, now, tonumber(c[5])}
end

redis.call('HSET', KEYS[1], 'status', 'redeemed', 'redeemed_at', now)
redis.call('HINCRBY', KEYS[2], 'redeemed:' .. c[6] .. ':' .. venue_id, 1)
redis.call('ZADD', KEYS[3], now, code)
redis.call('XADD', KEYS[4], '*', 'type', 'redeem', 'code', code, 'round', c[6],
  'venue', venue_id, 'member', c[7], 'at', now)
local out = {0, now}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
  out[#out + 1] = v
end
return out
