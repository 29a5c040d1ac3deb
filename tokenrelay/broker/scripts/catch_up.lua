-- A reader's catch-up page in one round trip: the entries after its cursor and, when asked,
-- the first entry still retained if MAXLEN ever trimmed the stream (the reader then reports a
-- StreamGap instead of skipping what it never read).
-- KEYS: 1 events stream, 2 meta hash
-- ARGV: 1 XRANGE start, exclusive ('(<id>'), 2 page size, 3 '1' to look for trimming
-- Returns {first retained id, or '' when the stream was never trimmed or it was not asked,
-- the entries as XRANGE returns them}.
local first = ''
if ARGV[3] == '1' and redis.call('HGET', KEYS[2], 'trimmed') then
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if head[1] then first = head[1][1] end
end
return {first, redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
