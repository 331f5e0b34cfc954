-- herd: apply one request's changes to a session hash, all or nothing.
--
-- KEYS[1]  the session's key; KEYS[2] its new key when the id is cycled (same script, one round trip).
-- ARGV[1]  mode: 'new' (KEYS[1] must not exist) | 'existing' (must exist) | 'cycle' (must exist, moves;
--          single server only: RENAME across cluster slots is illegal, the cluster path is in store.rs)
-- ARGV[2]  now, unix ms          ARGV[3] idle timeout, ms      ARGV[4] absolute timeout, ms
-- ARGV[5]  size limit in bytes for the whole session (0: checked by the caller)
-- ARGV[6]  '1' to clear every user field first
-- ARGV[7]  owner to set ('' = unchanged)     ARGV[8] per-session idle timeout, ms ('' = unchanged)
-- ARGV[9]  field to increment ('' = none)    ARGV[10] increment
-- ARGV[11] the time (unix ms) until which the owner's index lists this session ('' = unchanged); the
--          caller has updated the index before (same pipeline, or an earlier round trip)
-- ARGV[12] n, the number of fields to set; then n field/value pairs; then the fields to delete.
--
-- The meta field '$c' is the session's timing record 'created:touched:idle:indexed' (see store.rs):
-- created = start of the absolute timeout, touched = when the TTL was last pushed back, idle = the
-- per-session idle timeout ('' = the layer's), indexed = until when the owner's index lists it ('' =
-- no owner). An owned session's TTL never runs past 'indexed', so "log out everywhere" always finds
-- every live session.
--
-- Returns, as write.lua does, one string when applied: 'record n', or 'record n owner' when the session
-- has an owner (record = the timing record now stored, n = the incremented value, 0 without an
-- increment; one bulk reply is cheaper for the client to parse than an array of four). Otherwise
-- {status, n, false, false}: 0 = the session is gone (destroyed or expired: never resurrected),
-- 2 = the id is taken, 3 = too large (n = size), 4 = the incremented field is not an integer, 5 = the
-- id was cycled away (a tombstone '$t', or '$m' while a cluster cycle runs): the session lives on
-- under an id this request does not know, and nothing is written. Every check runs before the first
-- write, so a refused save writes nothing.
--
-- A cycle leaves a tombstone under the old id: a hash holding only '$t', no data and no pointer to
-- the new id (a fixated pre-login id gains nothing), expiring after a minute. A later request with
-- the old id learns "cycled away" instead of "gone", so it neither removes the browser's cookie nor
-- starts a fresh session whose cookie would replace the login's.
local key = KEYS[1]
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local idle = tonumber(ARGV[3])
local absolute = tonumber(ARGV[4])
local max_bytes = tonumber(ARGV[5])
local clear = ARGV[6] == '1'
local owner = ARGV[7]
local idle_override = ARGV[8]
local incr_field = ARGV[9]
local incr_by = ARGV[10]
local index_until = ARGV[11]
local nset = tonumber(ARGV[12])
local first_set = 13
local first_del = first_set + 2 * nset

local gone = {0, 0, false, false}
local tombstone_ms = 60000

-- HINCRBY of the session's key, checked by Redis itself (it refuses a non-integer and writes
-- nothing): the new value, or nil and the reply to give. Only "not an integer" is the caller's
-- mistake; anything else (READONLY, OOM, ...) goes back to the client as the error it is.
local function incr_checked()
  local r = redis.pcall('HINCRBY', key, incr_field, incr_by)
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'not an integer', 1, true) then return nil, {4, 0, false, false} end
    return nil, redis.error_reply(r.err)
  end
  return r
end
local created = now
local session_idle = nil
local indexed = nil
local current_owner = false
if mode == 'new' then
  if redis.call('EXISTS', key) == 1 then return {2, 0, false, false} end
else
  local meta = redis.call('HMGET', key, '$c', '$o', '$m', '$t')
  -- '$m': the id is being cycled to another slot on a cluster (store.rs); '$t': it was cycled.
  if meta[3] or meta[4] then return {5, 0, false, false} end
  if not meta[1] then return gone end
  local c, _, i, x = string.match(meta[1], '^(%d+):?(%d*):?(%d*):?(%d*)$')
  if not c then return gone end
  if i ~= '' then session_idle = tonumber(i) end
  if x ~= '' then indexed = tonumber(x) end
  current_owner = meta[2]
  if mode == 'cycle' then
    if redis.call('EXISTS', KEYS[2]) == 1 then return {2, 0, false, false} end
  else
    created = tonumber(c)
  end
end
if idle_override ~= '' then session_idle = tonumber(idle_override) end
if session_idle then idle = session_idle end
if index_until ~= '' then
  local until_ms = tonumber(index_until)
  -- A new owner's index starts over; the same owner's only ever grows (concurrent bumps).
  if owner ~= '' or not indexed or until_ms > indexed then indexed = until_ms end
end
local ttl = math.min(idle, created + absolute - now)
if (owner ~= '' or current_owner) and indexed then ttl = math.min(ttl, indexed - now) end
if ttl <= 0 then return gone end

local sets = {}
for i = first_set, first_del - 1, 2 do sets[ARGV[i]] = ARGV[i + 1] end
local dels = {}
for i = first_del, #ARGV do dels[ARGV[i]] = true end

-- An increment of a stored field that this save does not otherwise touch runs as the first write,
-- checked by HINCRBY itself (it refuses a non-integer and writes nothing): no HGET beforehand.
local incr_first = incr_field ~= '' and mode == 'existing' and sets[incr_field] == nil
  and not dels[incr_field] and not clear
if incr_field ~= '' and not incr_first then
  local current = sets[incr_field]
  if current == nil and not dels[incr_field] and not clear and mode ~= 'new' then
    current = redis.call('HGET', key, incr_field)
  end
  if current and not string.match(current, '^%-?%d+$') then return {4, 0, false, false} end
end

if max_bytes > 0 then
  local total = 0
  if mode ~= 'new' and not clear then
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      local f = all[i]
      if string.sub(f, 1, 1) ~= '$' and sets[f] == nil and not dels[f] then
        total = total + #f + #all[i + 1]
      end
    end
  end
  for f, v in pairs(sets) do total = total + #f + #v end
  if total > max_bytes then return {3, total, false, false} end
end

-- Checks done: write.
local n = 0
if incr_first then
  local refused
  n, refused = incr_checked()
  if refused then return refused end
end
if mode == 'cycle' then
  redis.call('RENAME', key, KEYS[2])
  redis.call('HSET', key, '$t', '1')
  redis.call('PEXPIRE', key, tombstone_ms)
  key = KEYS[2]
end
local function ms(v) if v then return string.format('%d', v) end return '' end
local record = ms(created) .. ':' .. ms(now) .. ':' .. ms(session_idle) .. ':' .. ms(indexed)
redis.call('HSET', key, '$c', record)
if clear then
  local fields = redis.call('HKEYS', key)
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 1) ~= '$' then redis.call('HDEL', key, f) end
  end
end
if nset > 0 then redis.call('HSET', key, unpack(ARGV, first_set, first_del - 1)) end
if first_del <= #ARGV then redis.call('HDEL', key, unpack(ARGV, first_del, #ARGV)) end
if owner ~= '' then
  redis.call('HSET', key, '$o', owner)
  current_owner = owner
end
if incr_field ~= '' and not incr_first then n = redis.call('HINCRBY', key, incr_field, incr_by) end
redis.call('PEXPIRE', key, string.format('%d', ttl))
-- Lua numbers are doubles: past 2^53 the value is read back as Redis wrote it.
if math.abs(n) >= 9007199254740992 then n = redis.call('HGET', key, incr_field)
else n = string.format('%d', n) end
local applied = record .. ' ' .. n
if current_owner then return applied .. ' ' .. current_owner end
return applied
