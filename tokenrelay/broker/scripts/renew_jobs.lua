-- Renew a worker's leases: reset the idle time of the queue entries it still owns, and list
-- the entries it was handed but does not know of.
-- KEYS: 1 queue stream; ARGV: 1 group, 2 consumer, 3 the idle time (ms) from which an entry of
-- the consumer's not renewed here counts as a stray, then entry ids.
-- An entry another worker took over (XAUTOCLAIM) or that was acknowledged is not touched, and
-- its id is returned: the caller's run was superseded.
-- A stray is an entry of the consumer's, idle that long, that it did not name (at most 100):
-- one delivered by a read whose reply never reached it (its connection cut while the read
-- blocked), which would wait a whole lease for a takeover otherwise.
-- Returns {superseded ids, stray ids}.
local lost = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #mine == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
local strays = {}
for _, entry in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', 100,
                                  ARGV[2])) do
  strays[#strays + 1] = entry[1]
end
return {lost, strays}
