-- KEYS[1]: the set of live sessions (see admit.lua).
-- ARGV: member, ttl_ms (-1: the session is gone, forget it). A session that ended is counted
-- until its retention ends; one released, not at all. The set lives as long as its
-- longest-lived member, and goes with the last.
local ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ttl < 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #top == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(top[2])) + 1)
end
return 1
