-- Replace one instance's reservations on a node with the ones it really holds, atomically: after
-- the store was unreachable, releases and commits it sent may be missing and a reservation whose
-- reply it never saw may have been taken after all. Members of other instances are left alone.
-- Expiries are on the server's clock (TIME), as in reserve.lua.
-- KEYS[1] = {P:node:<id>}:resv (zset member -> expiry ms)
-- ARGV[1] = member prefix of the instance ("<instance id>|"), ARGV[2..] = member, ttl ms, ...
-- Returns {removed, added}: members dropped, and members that were missing (or about to expire).
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local prefix = ARGV[1]
local held = {}
for i = 2, #ARGV, 2 do
  held[ARGV[i]] = tonumber(ARGV[i + 1])
end
local removed = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix and not held[m] then
    redis.call('ZREM', KEYS[1], m)
    removed = removed + 1
  end
end
local added = 0
local longest = 0
for m, ttl in pairs(held) do
  local score = redis.call('ZSCORE', KEYS[1], m)
  if not score or tonumber(score) < now + ttl then
    if not score then
      added = added + 1
    end
    redis.call('ZADD', KEYS[1], now + ttl, m)
  end
  if ttl > longest then
    longest = ttl
  end
end
if longest > 0 and redis.call('PTTL', KEYS[1]) < longest * 2 then
  redis.call('PEXPIRE', KEYS[1], longest * 2)
end
return {removed, added}
