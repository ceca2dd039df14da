-- void.lua: a member hands back an issued coupon; its stock goes back.
--
-- KEYS
--   1 coupon hash       cpn:{C}:coupon:<code>
--   2 stock hash        cpn:{C}:stock              (field <R>:<V>)
--   3 stats hash        cpn:{C}:stats              (void / returned_open / returned_closed)
--   4 event stream      cpn:{C}:events
--   5 campaign hash     cpn:{C}:campaign           (field closed:<R>: an operator's early close)
-- ARGV
--   1 member id (the caller; another member's coupon is NOT_FOUND)
--   2 coupon code (canonical)
--   3 pub/sub channel told when stock returns to an open round
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 VOIDED              {0, now, restocked (1|0), field, value, ...}  the coupon after
--   1 NOT_FOUND           {1, now}
--   2 ALREADY_REDEEMED    {2, now, redeemed_at_ms}
--   3 ALREADY_VOID        {3, now}
--
-- Quotas are not given back: a member who voids still counts the coupon.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member_id, code, channel = ARGV[1], ARGV[2], ARGV[3]

local c = redis.call('HMGET', KEYS[1], 'member', 'status', 'redeemed_at', 'round', 'venue',
  'closes_at')
if not c[1] or c[1] ~= member_id then
  return {1, now}
end
if c[2] == 'redeemed' then
  return {2, now, tonumber(c[3])}
end
if c[2] == 'void' then
  return {3, now}
end

local rv = c[4] .. ':' .. c[5]
local restocked = 0
-- The coupon keeps the close its round had at the grant; an operator may have closed
-- the round earlier since (close.lua), and then the stock no longer goes back.
local closes = tonumber(c[6])
local early = redis.call('HGET', KEYS[5], 'closed:' .. c[4])
if early and tonumber(early) < closes then
  closes = tonumber(early)
end
redis.call('HSET', KEYS[1], 'status', 'void', 'voided_at', now)
redis.call('HINCRBY', KEYS[3], 'void:' .. rv, 1)
if now < closes then
  restocked = 1
  redis.call('HINCRBY', KEYS[2], rv, 1)
  redis.call('HINCRBY', KEYS[3], 'returned_open:' .. rv, 1)
  redis.call('PUBLISH', channel, 'restock ' .. rv)
else
  redis.call('HINCRBY', KEYS[3], 'returned_closed:' .. rv, 1)
end
redis.call('XADD', KEYS[4], '*', 'type', 'void', 'code', code, 'round', c[4],
  'venue', c[5], 'member', member_id, 'at', now, 'restocked', restocked)
local out = {0, now, restocked}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
  out[#out + 1] = v
end
return out
