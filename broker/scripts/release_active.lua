-- Clear a thread's active-run pointer only if it still names this run (compare-and-delete).
-- KEYS: 1 thread active key; ARGV: 1 run id. Returns 1 when cleared.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
