local st = redis.call('HGET', KEYS[1], 'status')
if st then st = check_lease(st, ARGV[6]) end
if st then
  return {0, info(st)}
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'status', 'starting', 'first', 1, 'last', 0, 'bytes', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
return {1}
