-- One room's shared state, changed atomically (multi-instance mode; server/room_cluster.py).
-- KEYS[1] = {P:room:<code>}:meta    (hash: room_id, created_ms, last_ms, seq)
-- KEYS[2] = {P:room:<code>}:members (hash session_id -> member JSON:
--            {session_id, instance, display_name, preferred_lang, joined_at, seq, raw_voice})
-- ARGV[1] = the operation, ARGV[2] = the keys' lifetime in ms (refreshed by every change: a room whose
-- instances all died goes by itself), then per operation:
--   create  ARGV[3] = room_id, ARGV[4] = the first member's JSON   -> {"ok"} | {"taken"}
--   join    ARGV[3] = member JSON, ARGV[4] = max members          -> {"ok", room_id, members...}
--           | {"not_found"} | {"already"} | {"full"}
--   leave   ARGV[3] = session_id                                 -> {"ok", room_id, members...}
--           | {"closed", room_id} | {"not_member"}
--   pref    ARGV[3] = session_id, ARGV[4] = target, ARGV[5] = "1"|"0" -> {"ok", room_id, members...}
--           | {"not_member"} | {"no_target"}
--   spoke                                                         -> {"ok"} | {"not_found"}
--   expire  ARGV[3] = idle ms after which the room ends           -> {"expired", room_id, members...}
--           | {"alive", ms left} | {"not_found"}
--   drop    ARGV[3] = a dead instance's id: its members leave     -> {"ok", room_id, members...}
--           | {"closed", room_id, members...} | {"none"}
-- The code is unique cluster-wide: create writes the meta hash only if it does not exist (as SET NX);
-- the member limit holds because join counts and adds in one step.
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 7: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, ttl = ARGV[1], tonumber(ARGV[2])
local meta, members = KEYS[1], KEYS[2]

local function refresh()
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', members, ttl)
end

local function listing(status)
  local out = {status, redis.call('HGET', meta, 'room_id')}
  for _, v in ipairs(redis.call('HVALS', members)) do out[#out + 1] = v end
  return out
end

if op == 'create' then
  if redis.call('EXISTS', meta) == 1 then return {'taken'} end
  local m = cjson.decode(ARGV[4])
  m.seq = 1
  m.joined_at = now
  redis.call('HSET', meta, 'room_id', ARGV[3], 'created_ms', now, 'last_ms', now, 'seq', 1)
  redis.call('HSET', members, m.session_id, cjson.encode(m))
  refresh()
  return {'ok'}
end
if redis.call('EXISTS', meta) == 0 then
  if op == 'leave' or op == 'pref' then return {'not_member'} end
  if op == 'drop' then return {'none'} end
  return {'not_found'}
end
if op == 'join' then
  local m = cjson.decode(ARGV[3])
  if redis.call('HEXISTS', members, m.session_id) == 1 then return {'already'} end
  if redis.call('HLEN', members) >= tonumber(ARGV[4]) then return {'full'} end
  m.seq = redis.call('HINCRBY', meta, 'seq', 1)
  m.joined_at = now
  redis.call('HSET', members, m.session_id, cjson.encode(m))
  redis.call('HSET', meta, 'last_ms', now)
  refresh()
  return listing('ok')
end
local function remove(sid)
  redis.call('HDEL', members, sid)
  for k, v in pairs(redis.call('HGETALL', members)) do
    if k % 2 == 0 then
      local other = cjson.decode(v)
      if type(other.raw_voice) == 'table' and other.raw_voice[sid] ~= nil then
        other.raw_voice[sid] = nil
        redis.call('HSET', members, other.session_id, cjson.encode(other))
      end
    end
  end
end
local function after_removal()
  if redis.call('HLEN', members) == 0 then
    local id = redis.call('HGET', meta, 'room_id')
    redis.call('DEL', meta, members)
    return {'closed', id}
  end
  refresh()
  return listing('ok')
end
if op == 'leave' then
  if redis.call('HEXISTS', members, ARGV[3]) == 0 then return {'not_member'} end
  remove(ARGV[3])
  return after_removal()
end
if op == 'pref' then
  local raw = redis.call('HGET', members, ARGV[3])
  if not raw then return {'not_member'} end
  if ARGV[4] == ARGV[3] or redis.call('HEXISTS', members, ARGV[4]) == 0 then return {'no_target'} end
  local m = cjson.decode(raw)
  if type(m.raw_voice) ~= 'table' or next(m.raw_voice) == nil then m.raw_voice = {} end
  m.raw_voice[ARGV[4]] = (ARGV[5] == '1')
  redis.call('HSET', members, ARGV[3], cjson.encode(m))
  refresh()
  return listing('ok')
end
if op == 'spoke' then
  redis.call('HSET', meta, 'last_ms', now)
  refresh()
  return {'ok'}
end
if op == 'expire' then
  local idle = now - tonumber(redis.call('HGET', meta, 'last_ms'))
  local limit = tonumber(ARGV[3])
  if idle < limit then return {'alive', limit - idle} end
  local out = listing('expired')
  redis.call('DEL', meta, members)
  return out
end
if op == 'drop' then
  local gone = 0
  for _, v in ipairs(redis.call('HVALS', members)) do
    local m = cjson.decode(v)
    if m.instance == ARGV[3] then
      remove(m.session_id)
      gone = gone + 1
    end
  end
  if gone == 0 then return {'none'} end
  return after_removal()
end
return redis.error_reply('unknown room operation ' .. op)
