-- Admit one session of a tenant against its cluster-wide cap, atomically: two instances admitting at
-- the same moment cannot both take the last place.
-- KEYS[1] = {P:fleet}:tenant:<tenant>:counts (hash instance -> sessions of the tenant admitted there)
-- KEYS[2] = {P:fleet}:instances              (zset instance -> presence expiry ms)
-- ARGV[1] = this instance's id, ARGV[2] = the cap,
-- ARGV[3] = how many of this instance's sessions of the tenant ended (released first)
-- A count is per instance, never per session: the work is O(instances), whatever the tenant's sessions.
-- An instance's count counts while its presence is live (ours always: we are asking). The field of an
-- instance gone from the zset (left, or taken over) is removed; that of an instance whose presence
-- merely expired is kept uncounted: after a stall tick.lua extends that presence again.
-- Returns {1, sessions counted} when admitted, {0, sessions counted} when full.
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local ended = tonumber(ARGV[3])
local mine = 0
local count = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local inst, n = fields[i], math.max(0, tonumber(fields[i + 1]) or 0)
  if inst == me then
    mine = math.max(0, n - ended) -- below zero: a release raced a lost admission; the re-sync repairs
  else
    local exp = tonumber(redis.call('ZSCORE', KEYS[2], inst) or '')
    if exp == nil then
      redis.call('HDEL', KEYS[1], inst)
    elseif exp > now then
      count = count + n
    end
  end
end
count = count + mine
if count >= tonumber(ARGV[2]) then
  if ended > 0 then
    if mine > 0 then redis.call('HSET', KEYS[1], me, mine) else redis.call('HDEL', KEYS[1], me) end
  end
  return {0, count}
end
redis.call('HSET', KEYS[1], me, mine + 1)
return {1, count + 1}
