-- Take over the queue entries whose owner has not renewed them for a lease, unless Redis (or
-- every worker) stood still lately: then the owners get a lease to renew first.
-- KEYS: 1 queue stream, 2 the lease clock (a hash in the queue's slot); ARGV: 1 group,
-- 2 consumer, 3 lease (ms), 4 how many to take at most (0: none, only the clock is read),
-- 5 the longest gap (ms) between two readings of the clock that is not a stall.
-- Returns the entries taken, [[id, [field, value, ...]], ...].
-- An entry's idle time is counted by Redis's clock, which runs on while Redis is paused or a
-- network keeps every worker from it; once it answers again, every running run would look
-- abandoned, and the first worker to ask would take them all over from live workers whose
-- renewals wait in the same queue of commands. Every worker reads the clock at each heartbeat,
-- so a gap longer than `5` means nobody could: takeovers wait one lease from then.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local clock = redis.call('HMGET', KEYS[2], 'tick', 'hold')
local tick, hold = tonumber(clock[1] or '0'), tonumber(clock[2] or '0')
if tick > 0 and now - tick > tonumber(ARGV[5]) then
  hold = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[2], 'hold', hold)
end
redis.call('HSET', KEYS[2], 'tick', now)
redis.call('EXPIRE', KEYS[2], 86400)
if now < hold or tonumber(ARGV[4]) <= 0 then return {} end
local taken = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
return taken[2]
