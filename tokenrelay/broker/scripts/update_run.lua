-- Update fields of a run's record only if `attempt` is still the run's current one (fencing: a
-- superseded worker writes nothing).
-- KEYS: 1 run meta hash; ARGV: 1 attempt, then field/value pairs.
-- Returns 1 when written, 0 when the run is gone or another attempt owns it.
if tonumber(redis.call('HGET', KEYS[1], 'attempt') or '-1') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
