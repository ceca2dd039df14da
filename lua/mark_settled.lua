-- mark_settled.lua: record in Redis that codes were paid to their venue (`settle`), so
-- reverse.lua refuses to undo their redemptions.
--
-- `settle` marks the codes it is about to pay with only_redeemed = 1: a code whose
-- redemption was reversed meanwhile is not marked, and `settle` does not pay it. The
-- archiver copies settlements recorded while Redis was away with only_redeemed = 0:
-- those were paid already, and a redemption of such a code must never be undone.
-- A code already marked keeps its first mark.
--
-- KEYS
--   1..n coupon hashes  cpn:{C}:coupon:<code>   (one stock shard's; field settled)
-- ARGV
--   1 settled at (ms)
--   2 only_redeemed: '1' marks only coupons whose status is redeemed, '0' any coupon
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 DONE                {0, now, i, ...}  the keys not marked, by position (1-based):
--                         i when the coupon is not redeemed (only_redeemed), -i when there
--                         is no such coupon

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at, only_redeemed = ARGV[1], ARGV[2] == '1'

local out = {0, now}
for i, key in ipairs(KEYS) do
  local c = redis.call('HMGET', key, 'status', 'settled')
  if not c[1] then
    out[#out + 1] = -i
  elseif only_redeemed and c[1] ~= 'redeemed' then
    out[#out + 1] = i
  elseif not c[2] then
    redis.call('HSET', key, 'settled', at)
  end
end
return out
