-- herd: the common write — user fields of an existing session and nothing else (a read-modify-write,
-- a counter) — checked and applied in one atomic step.
--
-- KEYS[1]  the session's key
-- ARGV[1]  field to increment ('' = none)     ARGV[2] increment
-- ARGV[3]  n, the number of fields to set; then n field/value pairs; then the fields to delete.
--
-- Returns 'record n' or 'record n owner' when applied (one string, see save.lua; n = the incremented
-- value, 0 without an increment; record = the timing record '$c' as stored, see store.rs); otherwise
-- {status, 0, false, false}:
-- status 0 when the key holds no session (destroyed, expired, never was: never resurrected), 5 when
-- the id was cycled away (a tombstone '$t', or '$m' while a cluster cycle runs), 4 when the
-- incremented field is not an integer. The checks run before the first write: a refused write
-- writes nothing.
--
-- Neither the TTL nor the record changes. The caller reads the record it gets back: a session past
-- its absolute deadline or its index coverage is treated as gone (its TTL was capped there, so Redis
-- is about to drop the key, and no read ever sees it again), and a due idle-timeout refresh is
-- done off the request's path by the save script, as after a read. That keeps this script to two
-- commands and three arguments: the save script's general path costs Redis about twice as much.
local key = KEYS[1]
local meta = redis.call('HMGET', key, '$c', '$o', '$m', '$t')
if meta[3] or meta[4] then return {5, 0, false, false} end
if not meta[1] then return {0, 0, false, false} end
local n = 0
if ARGV[1] ~= '' then
  n = redis.pcall('HINCRBY', key, ARGV[1], ARGV[2])
  if type(n) == 'table' and n.err then
    -- Only "not an integer" is the caller's mistake; anything else (OOM, READONLY, ...) goes back
    -- to the client as the error it is.
    if string.find(n.err, 'not an integer', 1, true) then return {4, 0, false, false} end
    return redis.error_reply(n.err)
  end
end
local last_set = 3 + 2 * tonumber(ARGV[3])
if last_set > 3 then redis.call('HSET', key, unpack(ARGV, 4, last_set)) end
if #ARGV > last_set then redis.call('HDEL', key, unpack(ARGV, last_set + 1, #ARGV)) end
-- Lua numbers are doubles: past 2^53 the value is read back as Redis wrote it.
if math.abs(n) >= 9007199254740992 then n = redis.call('HGET', key, ARGV[1])
else n = string.format('%d', n) end
local applied = meta[1] .. ' ' .. n
if meta[2] then return applied .. ' ' .. meta[2] end
return applied
