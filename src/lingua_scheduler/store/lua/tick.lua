-- One tick of an instance's liveness, on the server's clock (TIME): instances whose own clocks
-- disagree still agree on who is alive.
-- KEYS[1] = {P:fleet}:instances (zset instance -> expiry ms)
-- KEYS[2] = {P:fleet}:presence  (zset node -> expiry ms)
-- KEYS[3] = {P:fleet}:changes   (stream)
-- ARGV[1] = instance id, ARGV[2] = ttl ms, ARGV[3] = load batch JSON ('' for none),
-- ARGV[4] = change stream MAXLEN (approximate), ARGV[5..] = ids of the nodes the instance owns
-- Returns {now ms, id of each other instance whose presence expired, ...}
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
local pairs_ = {}
for i = 5, #ARGV do
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
local out = {now}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  if id ~= ARGV[1] then
    out[#out + 1] = id
  end
end
return out
