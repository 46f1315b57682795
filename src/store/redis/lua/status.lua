local m = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if m[1] ~= ARGV[3] then return false end
return m[2]
