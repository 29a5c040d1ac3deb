-- A run ended: clear the thread's active pointer only if it still names this run
-- (compare-and-delete, so a late stop never clears a newer run), and promote the next queued run.
-- KEYS: 1 thread active key, 2 thread pending list, 3 thread since key; ARGV: 1 run id, 2 now (ms).
-- Returns the promoted run id, '' when the thread went idle, or false when the pointer named
-- another run.
redis.call('LREM', KEYS[2], 0, ARGV[1])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
local next_run = redis.call('LPOP', KEYS[2])
if next_run then
  redis.call('SET', KEYS[1], next_run)
  redis.call('SET', KEYS[3], ARGV[2])
  return next_run
end
redis.call('DEL', KEYS[1], KEYS[3])
return ''
