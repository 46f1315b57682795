local m = redis.call('HMGET', KEYS[1], 'epoch', 'status', 'first', 'last')
if m[1] ~= ARGV[4] then return false end
local st = check_lease(m[2], ARGV[3])
if not st then return false end
local after = math.max(tonumber(ARGV[5]), tonumber(m[3]) - 1)
local upto = math.min(after + tonumber(ARGV[6]), tonumber(m[4]))
local entries = {}
if upto > after then
  -- Entries are keyed by their first sequence number: the one holding after + 1 is the last
  -- that starts at or before it; the range after it is bounded by sequence, so a read moves
  -- what it asked for and at most one chunk's worth before it.
  local from = string.format('%d-0', after + 1)
  local e = redis.call('XREVRANGE', KEYS[2], from, '-', 'COUNT', 1)
  if #e > 0 then
    from = string.format('%d-0', tonumber(string.match(e[1][1], '^(%d+)')) + 1)
  end
  local to, budget, size = string.format('%d-0', upto), tonumber(ARGV[7]), 0
  local function size_of(entry)
    local f = entry[2]
    for k = 1, #f, 2 do
      if f[k] == 'd' then return #f[k + 1] end
    end
    return 0
  end
  if #e > 0 then
    entries[1] = e[1]
    size = size_of(e[1])
  end
  -- A chunk that would take the page past the budget waits for the next read, unless it is the
  -- first: no reply holds more than the budget or one chunk.
  local full = size >= budget
  while not full do
    local batch = redis.call('XRANGE', KEYS[2], from, to, 'COUNT', 16)
    for j = 1, #batch do
      local s = size_of(batch[j])
      if #entries > 0 and size + s > budget then
        full = true
        break
      end
      entries[#entries + 1] = batch[j]
      size = size + s
    end
    if #batch < 16 then break end
    from = '(' .. batch[#batch][1]
  end
end
local first = m[3]
if #entries == 0 and upto > after then
  -- Events the meta hash counts are gone (their key was evicted or deleted).
  first = string.format('%d', retained_first(m[3], m[4]))
end
return {st, first, m[4], entries}
