-- KEYS[1]: the set of live sessions (a sorted set: member, the session's key base; score, the
-- Redis time in ms after which it cannot be alive any more).
-- ARGV: member, max (-1: no limit), ttl_ms. Returns 1 when the session may exist (it is counted
-- already, or there was room and it is counted now), 0 when the store is full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 1
end
local max = tonumber(ARGV[2])
if max >= 0 and redis.call('ZCARD', KEYS[1]) >= max then
  return 0
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
