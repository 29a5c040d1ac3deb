-- Append a batch of events to a run's stream and fan the batch out, in one round trip.
-- KEYS: 1 events stream, 2 blob hash, 3 meta hash, 4 cancel key, 5 live channel (a key, so a
--       cluster checks that it shares the run's slot: SPUBLISH from a script requires it)
-- ARGV: 1 maxlen, 2 ttl seconds, 3 now (ms), 4 status ('' keeps it), 5 batch sequence number
--       (0: none), 6 attempt (0: any), 7 publish command ('PUBLISH', or 'SPUBLISH' on a
--       cluster), 8 number of new blobs, then [blob_ref, blob] pairs, then [event, data,
--       blob_ref ('' for none)] triples.
-- An append from an attempt that is no longer the run's current one (its worker lost the lease
-- and another took over) writes nothing and returns '!fenced'.
-- A batch whose sequence number was already applied is skipped, so a producer may retry a batch
-- after a lost reply without duplicating it. Publishes msgpack [prev_id, [[id, event, data,
-- blob_ref], ...]]: prev_id lets a reader see that it missed a batch. Returns the run's cancel
-- request, if any.
local attempt = tonumber(ARGV[6])
if attempt > 0 and tonumber(redis.call('HGET', KEYS[3], 'attempt') or '0') ~= attempt then
  return '!fenced'
end
local cancel = redis.call('GET', KEYS[4])
local seq = tonumber(ARGV[5])
if seq > 0 then
  local applied = tonumber(redis.call('HGET', KEYS[3], 'seq') or '0')
  if seq <= applied then return cancel end
  redis.call('HSET', KEYS[3], 'seq', seq)
end
local maxlen = ARGV[1]
local ttl = tonumber(ARGV[2])
local nblobs = tonumber(ARGV[8])
local i = 9
for _ = 1, nblobs do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local prev = ''
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then prev = last[1][1] end
local batch = {}
local len_before = redis.call('XLEN', KEYS[1])
while i <= #ARGV do
  local e, d, m = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local id
  if m == '' then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'e', e, 'd', d)
  else
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'e', e, 'd', d, 'm', m)
  end
  batch[#batch + 1] = {id, e, d, m}
  i = i + 3
end
if #batch > 0 and redis.call('XLEN', KEYS[1]) < len_before + #batch then
  -- MAXLEN trimmed old entries: readers behind them must be told (StreamGap), not skipped.
  redis.call('HSET', KEYS[3], 'trimmed', 1)
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], 'status', ARGV[4], 'updated_at', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
if #batch > 0 then
  redis.call(ARGV[7], KEYS[5], cmsgpack.pack({prev, batch}))
end
return cancel
