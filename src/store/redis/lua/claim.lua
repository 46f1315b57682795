local st = redis.call('HGET', KEYS[1], 'status')
if st then st = check_lease(st, ARGV[6]) end
local replaced = false
if st then
  -- A finished session of the epoch ARGV[7] is replaced; any other is returned.
  replaced = ARGV[7] ~= '' and (st == 'completed' or st == 'failed' or st == 'cancelled')
    and redis.call('HGET', KEYS[1], 'epoch') == ARGV[7]
  if not replaced then
    return {0, info(st)}
  end
  redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'status', 'starting', 'first', 1, 'last', 0, 'bytes', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
if replaced then
  -- The readers of the replaced session learn that it is gone.
  redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
end
return {1}
