-- herd: optimistic write on any topology (the cluster replacement for WATCH/MULTI/EXEC).
--
-- KEYS[1..n]  string keys, all with one hash tag on a cluster
-- ARGV        for each key its expected value as a pair (present, value): present '0' = must not
--             exist; then for each key its new value as a pair: present '0' = delete it.
-- Returns 1 when every key held its expected value and the new values were written, else 0 (nothing
-- written). New values keep the key's TTL.
local n = #KEYS
for i = 1, n do
  local current = redis.call('GET', KEYS[i])
  local present = ARGV[2 * i - 1] == '1'
  if present then
    if current ~= ARGV[2 * i] then return 0 end
  elseif current then
    return 0
  end
end
for i = 1, n do
  local j = 2 * n + 2 * i - 1
  if ARGV[j] == '1' then
    redis.call('SET', KEYS[i], ARGV[j + 1], 'KEEPTTL')
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
