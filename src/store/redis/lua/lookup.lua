local st = check_lease(redis.call('HGET', KEYS[1], 'status'), ARGV[3])
if not st then return false end
return info(st)
