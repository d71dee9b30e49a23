-- Reserve one slot on a node, atomically, reaping expired reservations first.
-- KEYS[1] = {P:node:<id>}:resv  (zset member -> expiry ms)
-- KEYS[2] = {P:node:<id>}:state (hash: status)
-- ARGV[1] = member (job_id:attempt), ARGV[2] = max slots, ARGV[3] = now ms, ARGV[4] = ttl ms
-- Returns {1, "OK", used} or {0, reason, used}; reasons: NOT_READY, FULL, EXISTS.
local now = tonumber(ARGV[3])
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
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) * 2)
return {1, 'OK', used + 1}
