-- Admit one session of a tenant against its cluster-wide cap, atomically: two instances admitting at
-- the same moment cannot both take the last place.
-- KEYS[1] = {P:fleet}:tenant:<tenant>:sessions (set of "<instance>\t<session id>")
-- KEYS[2] = {P:fleet}:instances                (zset instance -> presence expiry ms)
-- ARGV[1] = this instance's id, ARGV[2] = the session id, ARGV[3] = the cap,
-- ARGV[4..] = ids of this instance's sessions of the tenant that ended (released first)
-- A member counts while its instance's presence is live (ours always: we are asking). Members of an
-- instance gone from the zset (left, or taken over) are removed; those of an instance whose presence
-- merely expired are kept uncounted: after a stall tick.lua extends that presence again.
-- Returns {1, sessions counted} when admitted (or already admitted), {0, sessions counted} when full.
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local mine = me .. '\t'
for i = 4, #ARGV do
  redis.call('SREM', KEYS[1], mine .. ARGV[i])
end
local member = mine .. ARGV[2]
local alive = {}
local count = 0
local found = false
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local sep = string.find(m, '\t', 1, true)
  local inst = sep and string.sub(m, 1, sep - 1) or ''
  local state = alive[inst]
  if state == nil then
    if inst == me then
      state = 'live'
    else
      local exp = tonumber(redis.call('ZSCORE', KEYS[2], inst) or '')
      state = (exp == nil and 'gone') or (exp > now and 'live') or 'expired'
    end
    alive[inst] = state
  end
  if state == 'gone' then
    redis.call('SREM', KEYS[1], m)
  elseif state == 'live' then
    count = count + 1
    if m == member then
      found = true
    end
  end
end
if found then
  return {1, count}
end
if count >= tonumber(ARGV[3]) then
  return {0, count}
end
redis.call('SADD', KEYS[1], member)
return {1, count + 1}
