-- Acknowledge and drop a finished job, only if `consumer` still owns it (a superseded worker must
-- not drop the entry its successor holds).
-- KEYS: 1 queue stream; ARGV: 1 group, 2 consumer, 3 entry id. Returns 1 when dropped, else 0.
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #mine == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
