-- grab.lua: decide one member's grab of one coupon, atomically.
--
-- KEYS
--   1 campaign hash     cpn:{C}:campaign        (field quota)
--   2 round hash        cpn:{C}:round:<R>       (fields o, c, q, vf, vu; p while paused)
--   3 stock hash        cpn:{C}:stock           (field <R>:<V> -> remaining)
--   4 stats hash        cpn:{C}:stats           (field issued:<R>:<V>)
--   5 member hash       cpn:{C}:member:<M>      (fields total, r:<R>, c: the member's codes,
--                                                17 characters each, newest first)
--   6 coupon hash       cpn:{C}:coupon:<code>   (the new coupon)
--   7 idempotency key   cpn:{C}:idem:<M>:<key>  (unused when ARGV[5] is '')
--   8 event stream      cpn:{C}:events
-- ARGV
--   1 round id
--   2 venue id
--   3 member id
--   4 new coupon code (canonical, 17 characters)
--   5 the request's Idempotency-Key, '' for none (it goes into the grant event, field
--     'idem', so that `coupon-engine restore` can rebuild the idempotency records)
--   6 idempotency TTL in seconds (positive integer)
-- RETURNS  {code, now_ms, ...}; now_ms is the Redis server's clock
--   0 GRANTED             {0, now, code, issued_at_ms, valid_from_ms, valid_until_ms, remaining}
--   1 REPLAYED            {1, now, code, issued_at_ms, valid_from_ms, valid_until_ms}
--   2 ROUND_NOT_FOUND     {2, now}
--   3 VENUE_NOT_FOUND     {3, now}
--   4 ROUND_NOT_OPEN      {4, now, opens_at_ms}
--   5 ROUND_CLOSED        {5, now, closes_at_ms}; also {5, now, valid_until_ms} once the
--                         round's coupons have expired (a round loaded before
--                         campaign files were refused for that): never sell an expired coupon
--   6 ROUND_QUOTA         {6, now}
--   7 CAMPAIGN_QUOTA      {7, now}
--   8 SOLD_OUT            {8, now}
--   9 IDEMPOTENCY_REUSED  {9, now}
--  10 CODE_COLLISION      {10, now}
--  11 BAD_ARGUMENT        {11, now, message}
--  12 ROUND_PAUSED        {12, now}
--
-- Every check runs before the first write, so a refusal changes nothing. A grant makes
-- five writes (six with an Idempotency-Key): each one Redis runs, wraps and appends to the
-- AOF costs CPU, so the member's counters and codes are one HSET of values read here
-- (docs/benchmarks.md, "Redis CPU per grant").

local function int_arg(s)
  -- tonumber accepts 'nan', 'inf', hex and exponents; a strict pattern does not.
  if type(s) ~= 'string' or not string.match(s, '^[0-9]+$') or #s > 15 then
    return nil
  end
  return tonumber(s)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local round_id, venue_id, member_id, code = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local idem_key = ARGV[5]
local ttl = int_arg(ARGV[6])
if type(idem_key) ~= 'string' or #idem_key > 64 then
  return {11, now, 'idempotency key must be a string of at most 64 characters'}
end
local use_idem = idem_key ~= ''
if not ttl or ttl < 1 then
  return {11, now, 'idempotency ttl must be a positive integer'}
end
if not code or #code ~= 17 or not string.match(code, '^[0-9A-Z]+$') then
  return {11, now, 'code must be 17 characters'}
end
if not member_id or member_id == '' then
  return {11, now, 'member id is empty'}
end

local fingerprint = round_id .. '/' .. venue_id
if use_idem then
  local prior = redis.call('GET', KEYS[7])
  if prior then
    local fp, pcode, pissued, pfrom, puntil =
      string.match(prior, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    if fp ~= fingerprint then
      return {9, now}
    end
    return {1, now, pcode, tonumber(pissued), tonumber(pfrom), tonumber(puntil)}
  end
end

local r = redis.call('HMGET', KEYS[2], 'o', 'c', 'q', 'vf', 'vu', 'p')
if not r[1] then
  return {2, now}
end
local opens, closes, round_quota = tonumber(r[1]), tonumber(r[2]), tonumber(r[3])
local stock_field = round_id .. ':' .. venue_id
local remaining = redis.call('HGET', KEYS[3], stock_field)
if not remaining then
  return {3, now}
end
remaining = tonumber(remaining)
if now < opens then
  return {4, now, opens}
end
if now >= closes then
  return {5, now, closes}
end
-- A coupon is never sold already expired (a campaign loaded before the load-time check):
-- as final as a close, so it is answered before a pause (which says "retry later").
local valid_until = tonumber(r[5])
if now >= valid_until then
  return {5, now, valid_until}
end
-- An operator's pause (pause.lua sets p): nothing is granted until resume.lua clears it.
if r[6] then
  return {12, now}
end

local m = redis.call('HMGET', KEYS[5], 'total', 'r:' .. round_id, 'c')
local total, in_round = tonumber(m[1] or '0'), tonumber(m[2] or '0')
if in_round >= round_quota then
  return {6, now}
end
local campaign_quota = tonumber(redis.call('HGET', KEYS[1], 'quota'))
if total >= campaign_quota then
  return {7, now}
end
if remaining <= 0 then
  return {8, now}
end
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {10, now}
end

-- All checks passed: write the grant. now is formatted once (a number passed to
-- redis.call is formatted on each call).
local now_s = tostring(now)
redis.call('HSET', KEYS[6],
  'round', round_id, 'venue', venue_id, 'member', member_id, 'status', 'issued',
  'issued_at', now_s, 'valid_from', r[4], 'valid_until', r[5], 'closes_at', r[2])
remaining = redis.call('HINCRBY', KEYS[3], stock_field, -1)
redis.call('HINCRBY', KEYS[4], 'issued:' .. stock_field, 1)
-- The member's counters and codes (newest first) in one write; nothing else writes them.
redis.call('HSET', KEYS[5], 'total', total + 1, 'r:' .. round_id, in_round + 1,
  'c', code .. (m[3] or ''))
if use_idem then
  redis.call('SET', KEYS[7],
    fingerprint .. '|' .. code .. '|' .. now_s .. '|' .. r[4] .. '|' .. r[5], 'EX', ttl)
end
redis.call('XADD', KEYS[8], '*', 'type', 'grant', 'code', code, 'round', round_id,
  'venue', venue_id, 'member', member_id, 'at', now_s, 'idem', idem_key)
return {0, now, code, now, tonumber(r[4]), tonumber(r[5]), remaining}
