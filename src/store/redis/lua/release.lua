local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] or m[2] ~= 'starting' then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
