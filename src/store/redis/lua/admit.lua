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
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
-- The set lives as long as its longest-lived member.
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(top[2])) + 1)
return 1
