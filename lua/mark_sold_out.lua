-- mark_sold_out.lua: record when stock lines were first seen sold out (monitoring only).
--
-- The state pollers call it; the earliest sighting wins (HSETNX). It writes only
-- while the campaign is loaded: a poll that read stock just before Redis lost its
-- data must not recreate a key of the campaign in the empty Redis (restore and
-- the reload guard rely on "no campaign keys" meaning "nothing loaded").
--
-- KEYS
--   1 campaign hash     cpn:{C}:campaign
--   2 sold-out hash     cpn:{C}:soldout        (field <R>:<V> -> ms)
-- ARGV
--   1 the time the poll read the stock (ms, Redis clock)
--   2.. stock lines '<round>:<venue>'
-- RETURNS  {code, ...}
--   0 MARKED              {0, n}  n lines recorded for the first time
--   1 NOT_LOADED          {1}     no campaign hash: nothing written

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {1}
end
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[1])
end
return {0, n}
