-- Append a batch of events to a run's stream and fan the batch out, in one round trip.
-- KEYS: 1 events stream, 2 blob hash, 3 meta hash, 4 cancel key, 5 live channel (a key, so a
--       cluster checks that it shares the run's slot: SPUBLISH from a script requires it)
-- ARGV: 1 maxlen, 2 ttl seconds, 3 now (ms), 4 status ('' keeps it), 5 batch sequence number
--       (0: none), 6 attempt (0: any; -1: only while no worker has started the run, which the
--       API uses to end a run still waiting in the queue), 7 publish command ('PUBLISH', or 'SPUBLISH' on a
--       cluster), 8 number of new blobs, then [blob_ref, blob] pairs, then [event, data,
--       blob_ref ('' for none)] triples.
-- An append from an attempt that is no longer the run's current one (its worker lost the lease
-- and another took over) writes nothing and returns '!fenced'.
-- A batch whose sequence number was already applied is skipped, so a producer may retry a batch
-- after a lost reply without duplicating it. Publishes msgpack [prev_id, [[id, event, data,
-- blob_ref], ...]]: prev_id lets a reader see that it missed a batch. Returns the run's cancel
-- request, if any.
-- Entry ids are `<thread seq>-<ms>`: the run's first event takes the thread seq `s0` (set in the
-- meta hash when the run starts, see RunStore.assign_seq_base) and each later one the next, so
-- ids increase across the thread's runs and the agent protocol's `seq` is the id's first part.
-- A run without `s0` gets Redis' own `<ms>-<n>` ids.
-- Per-run bookkeeping lives in the meta hash, read with one HMGET: `seq` (last applied batch),
-- `last` (newest entry id), `n` (entries ever appended; XLEN is only consulted once it passes
-- maxlen, since nothing can be trimmed before) and `touched` (when the TTLs were last renewed;
-- they are renewed when a quarter of the TTL has passed, when a key may be new, and at a
-- status change, not on every append).
local m = redis.call('HMGET', KEYS[3], 'attempt', 'seq', 'last', 'n', 'touched', 'status', 's0')
local attempt = tonumber(ARGV[6])
if attempt > 0 and tonumber(m[1] or '0') ~= attempt then
  return '!fenced'
end
if attempt < 0 and (tonumber(m[1] or '0') ~= 0 or m[6] ~= 'pending') then
  return '!fenced'
end
local cancel = redis.call('GET', KEYS[4])
local seq = tonumber(ARGV[5])
if seq > 0 and seq <= tonumber(m[2] or '0') then return cancel end
local maxlen = ARGV[1]
local ttl = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local nblobs = tonumber(ARGV[8])
local i = 9
for _ = 1, nblobs do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local prev = m[3] or ''
local batch = {}
local next_seq = tonumber(m[7] or '0')
if next_seq > 0 then next_seq = next_seq + tonumber(m[4] or '0') end
while i <= #ARGV do
  local e, d, r = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local id = '*'
  if next_seq > 0 then
    id = string.format('%d-%s', next_seq, ARGV[3])
    next_seq = next_seq + 1
  end
  if r == '' then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, id, 'e', e, 'd', d)
  else
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, id, 'e', e, 'd', d, 'm', r)
  end
  batch[#batch + 1] = {id, e, d, r}
  i = i + 3
end
local fields = {}
if seq > 0 then
  fields[#fields + 1] = 'seq'
  fields[#fields + 1] = seq
end
if #batch > 0 then
  local n = tonumber(m[4] or '0') + #batch
  fields[#fields + 1] = 'last'
  fields[#fields + 1] = batch[#batch][1]
  fields[#fields + 1] = 'n'
  fields[#fields + 1] = n
  if n > tonumber(maxlen) and redis.call('XLEN', KEYS[1]) < n then
    -- MAXLEN trimmed old entries: readers behind them must be told (StreamGap), not skipped.
    fields[#fields + 1] = 'trimmed'
    fields[#fields + 1] = 1
  end
end
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'status'
  fields[#fields + 1] = ARGV[4]
  fields[#fields + 1] = 'updated_at'
  fields[#fields + 1] = ARGV[3]
end
local renew = ARGV[4] ~= '' or nblobs > 0 or now - tonumber(m[5] or '0') > ttl * 250
if renew then
  fields[#fields + 1] = 'touched'
  fields[#fields + 1] = now
end
if #fields > 0 then
  redis.call('HSET', KEYS[3], unpack(fields))
end
if renew then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if #batch > 0 then
  redis.call(ARGV[7], KEYS[5], cmsgpack.pack({prev, batch}))
end
return cancel
