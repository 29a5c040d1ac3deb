-- Renew a worker's leases: reset the idle time of the queue entries it still owns.
-- KEYS: 1 queue stream; ARGV: 1 group, 2 consumer, then entry ids.
-- An entry another worker took over (XAUTOCLAIM) or that was acknowledged is not touched, and
-- its id is returned: the caller's run was superseded.
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #mine == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
