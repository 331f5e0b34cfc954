-- Extends a lease only if it still holds this holder's token (a conditional write: one script is
-- simpler than WATCH and works on a cluster). KEYS[1] the lease; ARGV[1] the token, ARGV[2] the
-- TTL in milliseconds. Returns 1 when renewed, 0 when the lease expired or another holder has it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
