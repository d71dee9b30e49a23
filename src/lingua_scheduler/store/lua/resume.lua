-- The claim on a session's resume record: exactly one instance continues a session.
-- KEYS[1] = {P:resume:<session id>}        (the ResumeRecord JSON)
-- KEYS[2] = {P:resume:<session id>}:claim  (the request id of the instance resuming it, then its outcome)
-- ARGV[1] = 'claim': ARGV[2] = request id, ARGV[3] = ttl ms. Claimed only while the record exists and
--           nobody else holds a claim. Returns 1 when claimed, 0 otherwise.
-- ARGV[1] = 'settle': ARGV[2] = the request id expected, ARGV[3] = the outcome to write ('' releases
--           the claim), ARGV[4] = ttl ms, ARGV[5] = '1' to delete the record too. Written only while the
--           claim is still that request id's. Returns the claim's value afterwards (false: none).
if ARGV[1] == 'claim' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
  return 0
end
local held = redis.call('GET', KEYS[2])
if held ~= ARGV[2] then return held end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
  return false
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if ARGV[5] == '1' then redis.call('DEL', KEYS[1]) end
return ARGV[3]
