-- herd: last step of cycling a session id on a Redis Cluster: the old key, still marked as moving
-- to ARGV[1] (see take.lua), becomes a tombstone (only '$t', one minute; see save.lua).
--
-- KEYS[1]  the old session's key    ARGV[1] the new id
--
-- Returns 1, or 0 when the mark is gone: the old session was deleted while the cycle ran (a
-- "log out everywhere" that read the owner's index before the new id was listed), so the caller
-- deletes the new session too rather than let it outlive that logout.
if redis.call('HGET', KEYS[1], '$m') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '$t', '1')
redis.call('PEXPIRE', KEYS[1], 60000)
return 1
