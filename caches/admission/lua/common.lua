-- Shared by record.lua, admit.lua, remove.lua and reconcile.lua (prepended to each; see shared.py).
-- KEYS (order: shared.KEY_ORDER): 1 window zset, 2 probation zset, 3 protected zset, 4 region hash,
--   5 size hash, 6 bytes hash (w/p/q), 7 tick, 8 sketch (BITFIELD u4), 9 sketch adds, 10 climber hash
-- ARGV (common): width, depth, budget, initial window, protected fraction
local W, P, Q, R, S, B, T, C, A, H = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local width, depth = tonumber(ARGV[1]), tonumber(ARGV[2])
local budget, pfrac = tonumber(ARGV[3]), tonumber(ARGV[5])
local ZS = {w = W, p = P, q = Q}
local wcap = math.floor(tonumber(redis.call('HGET', H, 'window') or ARGV[4]))
local mcap = budget - wcap
local function offsets(key)
  local h = redis.sha1hex(key)
  local out = {}
  for j = 0, depth - 1 do
    out[#out + 1] = j * width + (tonumber(string.sub(h, 8 * j + 1, 8 * j + 8), 16) % width)
  end
  return out
end
local function freq(key)
  local args = {}
  for _, o in ipairs(offsets(key)) do
    args[#args + 1] = 'GET'; args[#args + 1] = 'u4'; args[#args + 1] = '#' .. o
  end
  local vals = redis.call('BITFIELD', C, unpack(args))
  local m = 15
  for _, v in ipairs(vals) do if v < m then m = v end end
  return m
end
local tick = tonumber(redis.call('GET', T) or '0')
local function nexttick() tick = tick + 1; return tick end
local function bytes(r) return tonumber(redis.call('HGET', B, r) or '0') end
local function forget(key, region)
  local size = tonumber(redis.call('HGET', S, key) or '0')
  redis.call('ZREM', ZS[region], key)
  redis.call('HDEL', R, key)
  redis.call('HDEL', S, key)
  redis.call('HINCRBY', B, region, -size)
  return size
end
local function main_victim()
  local v = redis.call('ZRANGE', P, 0, 0)[1]
  if v then return v, 'p' end
  v = redis.call('ZRANGE', Q, 0, 0)[1]
  if v then return v, 'q' end
  return nil, nil
end
