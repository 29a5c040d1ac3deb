-- Make a new run the thread's active run, or queue it behind the active one.
-- KEYS: 1 thread active key, 2 thread pending list, 3 thread since key;
-- ARGV: 1 run id, 2 'enqueue' to queue when busy, 3 now (ms).
-- Returns {'started'}, {'queued'} or {'busy', <active run id>}.
-- Sent again with the same run (a reply lost, the client retrying), it answers as the first
-- time and changes nothing: the run is active already, or already waits in the thread's queue.
local active = redis.call('GET', KEYS[1])
if active == ARGV[1] then return {'started'} end
if not active then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[3], ARGV[3])
  return {'started'}
end
if ARGV[2] == 'enqueue' then
  if redis.call('LPOS', KEYS[2], ARGV[1]) then return {'queued'} end
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return {'queued'}
end
return {'busy', active}
