local m = redis.call('HMGET', KEYS[1], 'epoch', 'status', 'first', 'last', 'bytes')
if m[1] ~= ARGV[3] or m[2] ~= 'running' then
  return 0
end
local last = tonumber(m[4])
-- Check the whole append before writing anything: every chunk is already stored, or follows.
local upto = last
for i = 9, #ARGV, 3 do
  local first, n = tonumber(ARGV[i]), #ARGV[i + 1] / 4
  if not first or first < 1 or n < 1 or n % 1 ~= 0 then
    return redis.error_reply('ERR resumable-sse: malformed chunk')
  end
  if first + n - 1 > upto then
    if first > upto + 1 then
      return redis.error_reply(string.format(
        'ERR resumable-sse: events must be appended in order: got %d after %d', first, upto))
    end
    upto = first + n - 1
  end
end
-- Idempotent: a retried append whose reply was lost stores nothing twice.
if upto == last then
  return 1
end
local bytes = math.max(tonumber(m[5]) or 0, 0)
for i = 9, #ARGV, 3 do
  local id, ends, data = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local first, n = tonumber(id), #ends / 4
  if first + n - 1 > last then
    if first <= last then
      -- Partly stored (a retry that grouped the events differently): keep what follows `last`.
      local skip = last - first + 1
      local base = struct.unpack('<I4', ends, 4 * skip - 3)
      local rest = {}
      for k = skip + 1, n do
        rest[#rest + 1] = struct.pack('<I4', struct.unpack('<I4', ends, 4 * k - 3) - base)
      end
      ends, data = table.concat(rest), string.sub(data, base + 1)
      first, n = last + 1, n - skip
      id = string.format('%d', first)
    end
    redis.call('XADD', KEYS[2], id .. '-0', 'o', ends, 'd', data)
    last = first + n - 1
    bytes = bytes + #data
  end
end
-- Trim whole chunks, oldest first, while a limit is exceeded; never the newest chunk.
local max_events, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local hard_max_bytes, pinned = tonumber(ARGV[7]), tonumber(ARGV[8])
local keep_from = 0
if max_events > 0 then keep_from = last - max_events + 1 end
local old_first = tonumber(m[3])
local first = old_first
local function over(chunk_last)
  if hard_max_bytes > 0 and bytes > hard_max_bytes then return true end
  if pinned >= 0 and chunk_last > pinned then return false end
  return (max_bytes > 0 and bytes > max_bytes) or chunk_last < keep_from
end
local done = false
while not done and over(first) do
  local e = redis.call('XRANGE', KEYS[2], string.format('%d-0', first), '+', 'COUNT', 16)
  if #e < 16 then done = true end
  for j = 1, #e do
    local id, f = e[j][1], e[j][2]
    local size, n = nil, nil
    for k = 1, #f, 2 do
      if f[k] == 'o' then n = #f[k + 1] / 4 elseif f[k] == 'd' then size = #f[k + 1] end
    end
    local chunk_last = tonumber(string.match(id, '^(%d+)')) + (n or 1) - 1
    if chunk_last >= last or not size or not over(chunk_last) then
      done = true
      break
    end
    bytes = bytes - size
    first = chunk_last + 1
  end
end
if first > old_first then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', first))
end
redis.call('HSET', KEYS[1], 'last', string.format('%d', last), 'first', string.format('%d', first),
  'bytes', string.format('%d', math.max(bytes, 0)))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], 'e' .. ARGV[2])
return 1
