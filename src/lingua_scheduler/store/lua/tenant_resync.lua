-- Make this instance's members of one tenant's session set exactly its live sessions: after a store
-- failure (an admission whose answer never came, a release lost) or a store that lost its data.
-- KEYS[1] = {P:fleet}:tenant:<tenant>:sessions (set of "<instance>\t<session id>")
-- ARGV[1] = this instance's member prefix ("<instance>\t"), ARGV[2..] = its live sessions' ids
-- Returns {members removed, members added}.
local prefix = ARGV[1]
local want = {}
for i = 2, #ARGV do
  want[prefix .. ARGV[i]] = true
end
local removed, added = 0, 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(m, 1, #prefix) == prefix and not want[m] then
    redis.call('SREM', KEYS[1], m)
    removed = removed + 1
  end
end
for m in pairs(want) do
  added = added + redis.call('SADD', KEYS[1], m)
end
return {removed, added}
