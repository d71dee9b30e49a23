-- Reserve one slot on a node, atomically, reaping expired reservations first. Expiries are on the
-- server's clock (TIME), so instances whose own clocks disagree cannot reap each other's slots.
-- KEYS[1] = {P:node:<id>}:resv  (zset member -> expiry ms)
-- KEYS[2] = {P:node:<id>}:state (hash: status)
-- ARGV[1] = member (job_id:attempt), ARGV[2] = max slots, ARGV[3] = ttl ms
-- Returns {1, "OK", used} or {0, reason, used}; reasons: NOT_READY, FULL, EXISTS.
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local used = redis.call('ZCARD', KEYS[1])
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'ready' then
  return {0, 'NOT_READY', used}
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, 'EXISTS', used}
end
if used >= tonumber(ARGV[2]) then
  return {0, 'FULL', used}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return {1, 'OK', used + 1}
