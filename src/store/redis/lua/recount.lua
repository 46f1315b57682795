-- KEYS[1]: the set of live sessions (see admit.lua).
-- ARGV: member, ttl_ms (-1: the session is gone, forget it). A session that ended is counted
-- until its retention ends; one released, not at all.
local ttl = tonumber(ARGV[2])
if ttl < 0 then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
