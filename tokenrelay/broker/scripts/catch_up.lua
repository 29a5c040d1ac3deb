-- A reader's catch-up page in one round trip: the entries after its cursor and, when asked,
-- the first entry still retained if MAXLEN ever trimmed the stream (the reader then reports a
-- StreamGap instead of skipping what it never read).
-- KEYS: 1 events stream, 2 meta hash
-- ARGV: 1 XRANGE start, exclusive ('(<id>'), 2 page size, 3 '1' to look for trimming
-- Returns one flat array: the first retained id (or '' when the stream was never trimmed or
-- it was not asked), then four values per entry: id, event name, data, blob ref (or ''). A
-- flat reply of plain strings costs the client far less to parse than XRANGE's nesting.
local first = ''
if ARGV[3] == '1' and redis.call('HGET', KEYS[2], 'trimmed') then
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if head[1] then first = head[1][1] end
end
local out = {first}
local n = 1
for _, row in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])) do
  local f = row[2]
  local e, d, m = '', '', ''
  for i = 1, #f, 2 do
    if f[i] == 'e' then e = f[i + 1] elseif f[i] == 'd' then d = f[i + 1]
    elseif f[i] == 'm' then m = f[i + 1] end
  end
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = row[1], e, d, m
  n = n + 4
end
return out
