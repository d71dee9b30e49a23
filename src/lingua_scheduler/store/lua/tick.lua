-- One tick of an instance's liveness, on the server's clock (TIME): instances whose own clocks
-- disagree still agree on who is alive.
-- KEYS[1] = {P:fleet}:instances       (zset instance -> expiry ms)
-- KEYS[2] = {P:fleet}:presence        (zset node -> expiry ms)
-- KEYS[3] = {P:fleet}:changes         (stream)
-- KEYS[4] = {P:fleet}:tenant_sessions (hash "<instance>\t<tenant>" -> live sessions)
-- KEYS[5] = {P:fleet}:last_tick       (string: TIME in ms of the last tick of any instance)
-- ARGV[1] = instance id, ARGV[2] = ttl ms, ARGV[3] = load batch JSON ('' for none),
-- ARGV[4] = change stream MAXLEN (approximate), ARGV[5] = JSON {tenant: sessions here} of the tenants
-- with limits, ARGV[6] = stall ms, ARGV[7..] = ids of the nodes the instance owns
-- Returns {now ms, {expired instance, ...}, {tenant, sessions on the other live instances, ...},
-- stall ms (0 unless a stall was found), 1 if this instance's presence was missing (else 0): the
-- store lost it (restarted empty) or another instance took this one over}
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
-- A stall: no instance ticked for longer than ARGV[6] (Redis itself was frozen, out of memory or cut
-- off from every instance). Nobody could refresh their presence meanwhile, so the silence says
-- nothing about who is alive: the instances that were alive when it began get its length back.
local stalled = 0
local last = tonumber(redis.call('GET', KEYS[5]) or '')
if last and now - last > tonumber(ARGV[6]) then
  stalled = now - last
  local alive_then = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. last, '+inf', 'WITHSCORES')
  for i = 1, #alive_then, 2 do
    redis.call('ZADD', KEYS[1], tonumber(alive_then[i + 1]) + stalled, alive_then[i])
  end
end
redis.call('SET', KEYS[5], now)
local expiry = now + tonumber(ARGV[2])
local missing = redis.call('ZSCORE', KEYS[1], me) and 0 or 1
redis.call('ZADD', KEYS[1], expiry, me)
local pairs_ = {}
for i = 7, #ARGV do
  pairs_[#pairs_ + 1] = expiry
  pairs_[#pairs_ + 1] = ARGV[i]
  if #pairs_ >= 1000 then -- unpack() has a stack limit: ZADD in slices
    redis.call('ZADD', KEYS[2], unpack(pairs_))
    pairs_ = {}
  end
end
if #pairs_ > 0 then
  redis.call('ZADD', KEYS[2], unpack(pairs_))
end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 't', 'load', 'd', ARGV[3])
end
local dead = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  if id ~= me then
    dead[#dead + 1] = id
  end
end
-- sessions per tenant: ours replace our fields; the other live instances' are summed; the fields of
-- instances no longer alive are dropped
for tenant, n in pairs(cjson.decode(ARGV[5])) do
  if tonumber(n) > 0 then
    redis.call('HSET', KEYS[4], me .. '\t' .. tenant, n)
  else
    redis.call('HDEL', KEYS[4], me .. '\t' .. tenant)
  end
end
local alive = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  alive[id] = true
end
local totals = {}
local fields = redis.call('HGETALL', KEYS[4])
for i = 1, #fields, 2 do
  local sep = string.find(fields[i], '\t', 1, true)
  local inst = sep and string.sub(fields[i], 1, sep - 1) or ''
  if not alive[inst] then
    redis.call('HDEL', KEYS[4], fields[i])
  elseif inst ~= me then
    local tenant = string.sub(fields[i], sep + 1)
    totals[tenant] = (totals[tenant] or 0) + tonumber(fields[i + 1])
  end
end
local flat = {}
for tenant, n in pairs(totals) do
  flat[#flat + 1] = tenant
  flat[#flat + 1] = n
end
return {now, dead, flat, stalled, missing}
