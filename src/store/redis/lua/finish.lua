local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
local st = m[2]
if not st or (ARGV[3] ~= '' and m[1] ~= ARGV[3]) then
  return 0
end
if st ~= 'starting' and st ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
