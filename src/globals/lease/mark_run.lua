-- Records that `Lease::every` runs its job now, only if the lease still holds this token (a
-- conditional write: one script, one slot). KEYS[1] the lease, KEYS[2] the last run;
-- ARGV[1] the token. Returns 1 when recorded, 0 when the lease is no longer held by the token.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local now = redis.call('TIME')
redis.call('SET', KEYS[2], string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2])))
return 1
