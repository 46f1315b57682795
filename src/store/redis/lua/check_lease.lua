local function check_lease(st, ttl_retention)
  if (st == 'starting' or st == 'running') and redis.call('EXISTS', KEYS[3]) == 0 then
    if st == 'starting' then
      -- Claimed by a process that died before its response came: as if never claimed.
      redis.call('DEL', KEYS[1], KEYS[2])
      redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
      return false
    end
    redis.call('HSET', KEYS[1], 'status', 'failed')
    redis.call('PEXPIRE', KEYS[1], ttl_retention)
    redis.call('PEXPIRE', KEYS[2], ttl_retention)
    redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
    return 'failed'
  end
  return st
end
-- The oldest retained sequence number: the meta hash's `first`, unless events were lost with
-- their key (evicted by a maxmemory policy, deleted, flushed) while the meta hash stayed. Then it
-- is the first of the oldest entry left (entries are keyed by their first sequence number), or
-- `last + 1` when none is: a reconnect is answered `410 evicted`, never an empty stream.
local function retained_first(first, last)
  first, last = tonumber(first) or 1, tonumber(last) or 0
  if last < first then return first end
  local e = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #e == 0 then return last + 1 end
  return math.max(first, tonumber(string.match(e[1][1], '^(%d+)')))
end
local function info(st)
  local m = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'first', 'last')
  local first = m[3] and string.format('%d', retained_first(m[3], m[4])) or m[3]
  return {m[1], st, m[2], first, m[4]}
end
