-- herd: delete a session (logout), unless its id was cycled away.
--
-- KEYS[1]  the session's key
--
-- Returns 1 when a session was deleted, 0 when there was none, 2 when the id was cycled away (a
-- tombstone '$t', or '$m' while a cluster cycle runs; see save.lua): the tombstone stays, so the
-- logout of a request that started before a login neither revives the old id nor reaches the new one.
local meta = redis.call('HMGET', KEYS[1], '$t', '$m')
if meta[1] or meta[2] then return 2 end
return redis.call('DEL', KEYS[1])
