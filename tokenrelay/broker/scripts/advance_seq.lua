-- Record the last seq a run of the thread used, so the thread's next run starts after it.
-- KEYS: 1 thread meta hash; ARGV: 1 the last seq. Never lowers it, and never creates the hash
-- of a thread that was deleted meanwhile.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last = tonumber(ARGV[1])
if last > tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') then
  redis.call('HSET', KEYS[1], 'seq', last)
end
return 1
