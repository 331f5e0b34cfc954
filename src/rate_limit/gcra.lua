-- One rate-limit decision: the generic cell rate algorithm (GCRA) in one script, so reading the
-- state, deciding and writing the new state are one step, and on Redis' clock (TIME), so the
-- clocks of the machines that ask never matter.
-- KEYS[1] the state of one client: its theoretical arrival time (TAT), µs of Redis' clock.
-- ARGV[1] the emission interval T in µs (period / limit), ARGV[2] the burst B, ARGV[3] the cost.
-- Returns {allowed (1/0), remaining, retry after in µs (0 when allowed), µs until the state is
-- back to "full"}.
-- A client may be B·T ahead of its schedule: a burst of B, then one more every T.
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now_us then
  tat = now_us
end
local new_tat = tat + cost * interval
local allow_at = new_tat - burst * interval
if allow_at > now_us then
  local remaining = math.floor((burst * interval - (tat - now_us)) / interval)
  return {0, remaining, allow_at - now_us, tat - now_us}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now_us) / 1000))
local remaining = math.floor((burst * interval - (new_tat - now_us)) / interval)
return {1, remaining, 0, new_tat - now_us}
