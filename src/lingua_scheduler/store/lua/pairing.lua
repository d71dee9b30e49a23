-- Pairing codes shared by the instances (multi-instance mode; server/pairing_service.py). Every key is
-- in the one slot {P:pair}: codes are few (one per node that asked) and short-lived.
-- ARGV[1] = the operation, then per operation:
--   issue   KEYS[1] = {P:pair}:code:<sha256 of the code>, KEYS[2] = {P:pair}:node:<node id>;
--           ARGV[2] = node id, ARGV[3] = lifetime ms, ARGV[4] = the code's digest
--           -> 1 (issued: the node's earlier code is gone) | 0 (the code is live already: draw another)
--   redeem  KEYS[1] = the code's key -> the node id (the code is gone: single use) | false
--   revoke  KEYS[2] = the node's key -> 1 | 0 (its code, if any, is gone)
--   attempt KEYS[1] = {P:pair}:src:<source key>; ARGV[2] = tokens per ms, ARGV[3] = burst
--           -> {1, 0} allowed | {0, ms until one more attempt}: the source's token bucket, shared
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local op = ARGV[1]
if op == 'issue' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local old = redis.call('GET', KEYS[2])
  -- the node's earlier code: named by its digest, a key of the same slot (the {P:pair} tag)
  if old then redis.call('DEL', (KEYS[1]:gsub(':code:.*$', ':code:' .. old))) end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
  return 1
end
if op == 'redeem' then
  local node = redis.call('GET', KEYS[1])
  if not node then return false end
  redis.call('DEL', KEYS[1])
  return node
end
if op == 'revoke' then
  local old = redis.call('GET', KEYS[2])
  if not old then return 0 end
  redis.call('DEL', KEYS[2], (KEYS[2]:gsub(':node:.*$', ':code:' .. old)))
  return 1
end
if op == 'attempt' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  local allowed = tokens >= 1
  if allowed then tokens = tokens - 1 end
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
  if allowed then return {1, 0} end
  return {0, math.ceil((1 - tokens) / rate)}
end
return redis.error_reply('unknown pairing operation ' .. op)
