-- Append a batch of events to each of some runs' streams and fan each batch out, in one round
-- trip: one call per flush of a worker (one per run on a cluster, where a call's keys must share
-- a slot), so a paced worker, whose flushes hold a token or two per run, costs Redis one script
-- call per flush rather than one per run.
-- KEYS: 5 per run: events stream, blob hash, meta hash, cancel key, live channel (a key, so a
--       cluster checks that it shares the run's slot: SPUBLISH from a script requires it)
-- ARGV: 1 maxlen, 2 ttl seconds, 3 now (ms), 4 publish command ('PUBLISH', or 'SPUBLISH' on a
--       cluster), 5 the runs' appends, in the order of KEYS, as one msgpack array (its strings
--       raw, binary-safe: Redis 7's cmsgpack reads no bin type), which costs the producer one
--       argument per call instead of several per event. Each run's is an array: status ('' keeps
--       it), batch sequence number (0: none), attempt (0: any; -1: only while no worker has
--       started the run, which the API uses to end a run still waiting in the queue), then an
--       array of new [blob_ref, blob] pairs, an array of [event, data, blob_ref ('' for none)]
--       rows and an array of other [field, value] pairs set in the meta hash with the batch (a
--       cancelled run's fork checkpoint id goes with its end: no round trip of its own, and
--       fenced like the end).
-- Returns, for each run, its cancel request (nil: none), or '!fenced' for an append from an
-- attempt that is no longer the run's current one (its worker lost the lease and another took
-- over): that append writes nothing.
-- A batch whose sequence number was already applied is skipped, so a producer may retry a batch
-- after a lost reply without duplicating it; so is an end (a status) the run already has. Publishes msgpack [prev_id, [[id, event, data,
-- blob_ref], ...]]: prev_id lets a reader see that it missed a batch.
-- Entry ids are `<thread seq>-<ms>`: the run's first event takes the thread seq `s0` (set in the
-- meta hash when the run starts, see RunStore.assign_seq_base) and each later one the next, so
-- ids increase across the thread's runs and the agent protocol's `seq` is the id's first part.
-- A run without `s0` gets Redis' own `<ms>-<n>` ids.
-- Per-run bookkeeping lives in the meta hash, read with one HMGET: `seq` (last applied batch),
-- `last` (newest entry id), `n` (entries ever appended; XLEN is only consulted once it passes
-- maxlen, since nothing can be trimmed before) and `touched` (when the TTLs were last renewed;
-- they are renewed when a quarter of the TTL has passed, when a key may be new, and at a
-- status change, not on every append).
local maxlen = ARGV[1]
local ttl = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local publish = ARGV[4]

-- The append of the run whose keys start at KEYS[k], its arguments `run`: its result.
local function append(k, run)
  local events, blobs, meta, cancel_key, live = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
    KEYS[k + 4]
  local status, seq, attempt, new_blobs, rows = run[1], run[2], run[3], run[4], run[5]
  local m = redis.call('HMGET', meta, 'attempt', 'seq', 'last', 'n', 'touched', 'status', 's0')
  if attempt > 0 and tonumber(m[1] or '0') ~= attempt then
    return '!fenced'
  end
  -- The same end again (sent twice, its reply lost): answered as the first, nothing written.
  -- Ends without a batch number are the API's (a worker's have one); nothing follows an end.
  local again = m[6] == status and status ~= '' and status ~= 'pending' and status ~= 'running'
  if attempt < 0 and (tonumber(m[1] or '0') ~= 0 or (m[6] ~= 'pending' and not again)) then
    return '!fenced'
  end
  local cancel = redis.call('GET', cancel_key)
  if again or (seq > 0 and seq <= tonumber(m[2] or '0')) then return cancel end
  for _, blob in ipairs(new_blobs) do
    redis.call('HSETNX', blobs, blob[1], blob[2])
  end
  local prev = m[3] or ''
  local batch = {}
  local next_seq = tonumber(m[7] or '0')
  if next_seq > 0 then next_seq = next_seq + tonumber(m[4] or '0') end
  for _, row in ipairs(rows) do
    local e, d, r = row[1], row[2], row[3]
    local id = '*'
    if next_seq > 0 then
      id = string.format('%d-%s', next_seq, ARGV[3])
      next_seq = next_seq + 1
    end
    if r == '' then
      id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, id, 'e', e, 'd', d)
    else
      id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, id, 'e', e, 'd', d, 'm', r)
    end
    batch[#batch + 1] = {id, e, d, r}
  end
  local fields = {}
  for _, pair in ipairs(run[6]) do
    fields[#fields + 1] = pair[1]
    fields[#fields + 1] = pair[2]
  end
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
    if n > tonumber(maxlen) and redis.call('XLEN', events) < n then
      -- MAXLEN trimmed old entries: readers behind them must be told (StreamGap), not skipped.
      fields[#fields + 1] = 'trimmed'
      fields[#fields + 1] = 1
    end
  end
  if status ~= '' then
    fields[#fields + 1] = 'status'
    fields[#fields + 1] = status
    fields[#fields + 1] = 'updated_at'
    fields[#fields + 1] = ARGV[3]
  end
  local renew = status ~= '' or #new_blobs > 0 or now - tonumber(m[5] or '0') > ttl * 250
  if renew then
    fields[#fields + 1] = 'touched'
    fields[#fields + 1] = now
  end
  if #fields > 0 then
    redis.call('HSET', meta, unpack(fields))
  end
  if renew then
    redis.call('EXPIRE', events, ttl)
    redis.call('EXPIRE', meta, ttl)
    redis.call('EXPIRE', blobs, ttl)
  end
  if #batch > 0 then
    redis.call(publish, live, cmsgpack.pack({prev, batch}))
  end
  return cancel
end

local results = {}
for i, run in ipairs(cmsgpack.unpack(ARGV[5])) do
  results[i] = append(5 * i - 4, run)
end
return results
