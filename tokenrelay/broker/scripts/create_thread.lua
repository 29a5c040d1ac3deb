-- Create a thread's record with a chosen id, all its fields at once, unless the thread exists.
-- KEYS: 1 thread meta hash; ARGV: 1 thread id, 2 created_at (ms), 3 metadata (JSON).
-- Returns 1 when created, 0 when a thread with the id exists. The same creation sent again (its
-- reply lost) finds its own record, the same time and metadata, and answers 1 again.
if redis.call('HEXISTS', KEYS[1], 'created_at') == 1 then
  local made = redis.call('HMGET', KEYS[1], 'created_at', 'metadata')
  if made[1] == ARGV[2] and made[2] == ARGV[3] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'thread_id', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[2],
  'metadata', ARGV[3])
return 1
