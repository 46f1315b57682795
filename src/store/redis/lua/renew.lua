local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] or (m[2] ~= 'starting' and m[2] ~= 'running') then
  return 0
end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
