-- Start a new attempt of a run for a worker (first start, takeover or hand-back alike).
-- KEYS: 1 run meta hash, 2 run cancel key; ARGV: 1 worker id, 2 now (ms), 3 max attempts,
-- 4 the id of the run's job in the queue (recorded, so a repair can tell whether it is still
-- there)
-- Returns {verdict, attempt, seq}: 'run' to execute, 'done' when the run already ended (or is
-- gone), 'exhausted' when this attempt would pass the limit, 'cancel:<action>' when a cancel
-- arrived before it started. `seq` is the last event batch an
-- earlier attempt wrote, so the new one continues after it. Every verdict but 'done' makes the
-- caller the run's current attempt, so whatever it writes next fences off the earlier ones.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'done', 0, 0} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' and status ~= 'running' then return {'done', 0, 0} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if attempt > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'attempt', attempt, 'updated_at', ARGV[2],
    'job', ARGV[4])
  return {'exhausted', attempt, seq}
end
local cancel = redis.call('GET', KEYS[2])
if cancel then
  redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'attempt', attempt, 'updated_at', ARGV[2],
    'job', ARGV[4])
  return {'cancel:' .. cancel, attempt, seq}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'attempt', attempt,
  'updated_at', ARGV[2], 'job', ARGV[4])
return {'run', attempt, seq}
