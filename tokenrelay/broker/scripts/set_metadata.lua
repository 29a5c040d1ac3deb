-- Replace a thread's metadata only if it is still what the caller read (compare-and-set), so
-- two merges made at once never drop one another's keys.
-- KEYS: 1 thread meta hash; ARGV: 1 metadata as read ('' when it had none), 2 new metadata,
-- 3 updated_at (ms).
-- Returns 1 when written, 0 when the metadata changed meanwhile, -1 when the thread is gone.
if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then
  return -1
end
local current = redis.call('HGET', KEYS[1], 'metadata') or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'metadata', ARGV[2], 'updated_at', ARGV[3])
return 1
