-- A run ended: clear the thread's active pointer only if it still names this run
-- (compare-and-delete, so a late stop never clears a newer run), and promote the next queued run.
-- KEYS: 1 thread active key, 2 thread pending list, 3 thread since key, 4 thread's last release;
-- ARGV: 1 run id, 2 now (ms), 3 a token naming this release (the same when it is sent again),
-- 4 seconds the last release is remembered.
-- Returns the promoted run id, '' when the thread went idle, or false when the pointer named
-- another run. A release sent again (its reply lost) answers what it answered the first time:
-- the run it promoted must still be queued by its caller, and no other caller learns it.
redis.call('LREM', KEYS[2], 0, ARGV[1])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  local last = redis.call('GET', KEYS[4])
  local prefix = ARGV[3] .. ' ' .. ARGV[1] .. ' '
  if last and string.sub(last, 1, #prefix) == prefix then
    return string.sub(last, #prefix + 1)
  end
  return false
end
local next_run = redis.call('LPOP', KEYS[2])
local promoted = ''
if next_run then
  redis.call('SET', KEYS[1], next_run)
  redis.call('SET', KEYS[3], ARGV[2])
  promoted = next_run
else
  redis.call('DEL', KEYS[1], KEYS[3])
end
redis.call('SET', KEYS[4], ARGV[3] .. ' ' .. ARGV[1] .. ' ' .. promoted, 'EX', ARGV[4])
return promoted
