local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] then
  return 0
end
if m[2] == 'running' then
  -- A retry after a lost reply: already started.
  return 1
end
if m[2] ~= 'starting' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'running', 'head', ARGV[4])
redis.call('PUBLISH', ARGV[1], 's' .. ARGV[2])
return 1
