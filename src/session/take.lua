-- herd: first step of cycling a session id on a Redis Cluster (the new key is in another slot, so
-- the single-server RENAME is illegal): mark the old session as moving and read it.
--
-- KEYS[1]  the session's key        ARGV[1] the new id (the mark)
--
-- Returns the session's fields and values (HGETALL); nil when the session does not exist; 0 when
-- its id was cycled away (a tombstone '$t', see save.lua) or is already moving to another id. Once
-- marked ('$m'), loads see the old id as cycled away and the save script refuses to write into it,
-- so the old id cannot be used any more even if the cycle stops half-way. Running it again with the
-- same new id answers the same (a retry is harmless).
--
-- A cycle that stops half-way (the process dies between its steps) leaves the old id refused for
-- no longer than a tombstone (one minute, settle.lua), not for the rest of its idle timeout: the
-- marked key's TTL is capped at that, and '$p' keeps the TTL it had, restored if the cycle is
-- refused and the mark removed (cycle.rs).
local key = KEYS[1]
local meta = redis.call('HMGET', key, '$c', '$m', '$t')
if meta[3] then return 0 end
if meta[2] and meta[2] ~= ARGV[1] then return 0 end
if not meta[1] then return nil end
redis.call('HSET', key, '$m', ARGV[1])
local fields = redis.call('HGETALL', key)
local ttl = redis.call('PTTL', key)
if ttl > 60000 then
  redis.call('HSET', key, '$p', ttl)
  redis.call('PEXPIRE', key, 60000)
end
return fields
