-- Make this instance's count of one tenant's sessions exactly its live sessions: after a store failure
-- (an admission whose answer never came, a release lost) or a store that lost its data.
-- KEYS[1] = {P:fleet}:tenant:<tenant>:counts (hash instance -> sessions of the tenant admitted there)
-- ARGV[1] = this instance's id, ARGV[2] = its live sessions of the tenant
-- Returns {sessions removed, sessions added}.
local before = math.max(0, tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0)
local want = tonumber(ARGV[2])
if want > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], want)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {math.max(0, before - want), math.max(0, want - before)}
