-- Acquires a lease if it is free. One script: "free?" and "take it with a new token" must be one
-- step, and the token is computed from the counter and Redis' clock in the same step.
-- KEYS[1] the lease, KEYS[2] its token counter (same hash tag); ARGV[1] the TTL in milliseconds.
-- Returns {1, token} when acquired, {0, remaining TTL in ms of the current holder} when held.
--
-- The token is max(last token + 1, Redis' clock in microseconds): strictly increasing while the
-- counter survives, and still increasing after it is lost (a restart without persistence, a
-- failover to a replica that missed the last INCR), as long as Redis' clock moved forward.
-- Microseconds since 1970 stay below 2^53, so Lua's doubles hold them exactly.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('PTTL', KEYS[1])}
end
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local token = math.max(last + 1, now_us)
local text = string.format('%.0f', token)
redis.call('SET', KEYS[2], text)
redis.call('SET', KEYS[1], text, 'PX', ARGV[1])
return {1, text}
