-- Extend a reservation when its job is acknowledged (running jobs hold the slot until they end).
-- Expiries are on the server's clock (TIME), as in reserve.lua.
-- KEYS[1] = {P:node:<id>}:resv; ARGV[1] = member, ARGV[2] = new ttl ms
-- Returns 1 if the reservation existed (and was extended), 0 if it had expired or was released.
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) * 2 then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
end
return 1
