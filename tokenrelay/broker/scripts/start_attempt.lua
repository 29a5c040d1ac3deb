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
local m = redis.call('HMGET', KEYS[1], 'attempt', 'seq', 'worker', 'job')
local seq = tonumber(m[2] or '0')
if status == 'running' and ARGV[4] ~= '' then
  -- The same worker asking again for the same job (its reply was lost and the call sent
  -- again): the attempt it started, not one more, which would fence the one it runs and use
  -- up the run's attempts while Redis is slow to answer.
  if m[3] == ARGV[1] and m[4] == ARGV[4] then return {'run', tonumber(m[1]), seq} end
  -- Another job of a run already running (its queueing was sent twice): nothing to do. A
  -- takeover claims the same job; a hand-back makes the run pending before queueing it again.
  if m[4] and m[4] ~= '' and m[4] ~= ARGV[4] then return {'done', 0, 0} end
end
local attempt = tonumber(m[1] or '0') + 1
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
