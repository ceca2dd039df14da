-- claim_active.lua: compare-and-set of cpn:active, the campaign this Redis serves.
--
-- cpn:active has no hash tag: on a cluster it is alone in its slot, so it is
-- claimed on its own, before the campaign's keys are written in their slot
-- (store/loading.py says why a crash in between is harmless).
--
-- KEYS
--   1 active campaign   cpn:active
-- ARGV
--   1 id of the campaign being loaded
--   2 a stale id it may replace ('' for none): a name left by an interrupted load
-- RETURNS  {code, ...}
--   0 CLAIMED             {0}          cpn:active names ARGV[1] (now, or already)
--   1 HELD                {1, holder}  another campaign holds it; nothing written

local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  return {0}
end
if cur == false or cur == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return {0}
end
return {1, cur}
