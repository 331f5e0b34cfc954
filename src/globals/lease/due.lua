-- How long until the job of `Lease::every` is due, on Redis' clock: the last run (by any holder)
-- plus the interval, minus now; 0 when overdue or never run; at most one interval.
-- KEYS[1] the last run (µs of Redis' clock); ARGV[1] the interval in µs. Returns µs.
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local wait = last + interval - now_us
if wait < 0 then
  return 0
end
return math.min(wait, interval)
