-- Frees a lease only if it still holds this holder's token (never another holder's lease).
-- KEYS[1] the lease; ARGV[1] the token. Returns 1 when released, 0 when it was no longer held.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
