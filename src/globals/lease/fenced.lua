-- A write accepted only from a fencing token at least as high as every token that wrote the
-- variable before: a holder that lost its lease (paused past its TTL) and whose successor has
-- written is refused. One script: the check and the write must be one step.
-- KEYS[1] the variable, KEYS[2] its fence mark (same hash tag);
-- ARGV[1] the token, ARGV[2] 'set' or 'incrby', ARGV[3] the value or the increment.
-- Returns {1, new value for incrby or 0} when written, {0, highest token seen} when refused.
local token = tonumber(ARGV[1])
local seen = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if token < seen then
  return {0, string.format('%.0f', seen)}
end
local result = 0
if ARGV[2] == 'incrby' then
  -- pcall: a variable that is not an integer leaves the mark untouched and answers the error.
  result = redis.pcall('INCRBY', KEYS[1], ARGV[3])
  if type(result) == 'table' and result.err then
    return result
  end
else
  redis.call('SET', KEYS[1], ARGV[3])
end
if token > seen then
  redis.call('SET', KEYS[2], ARGV[1])
end
return {1, result}
