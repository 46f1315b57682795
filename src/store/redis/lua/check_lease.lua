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
local function info(st)
  local m = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'first', 'last')
  return {m[1], st, m[2], m[3], m[4]}
end
