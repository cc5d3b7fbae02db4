"""The semantic store's Lua scripts, each run atomically by Redis.

Why Lua: store, expiry reclaim and eviction must happen in one step, so the entry and byte
budgets hold with many replicas writing at once, and a hit count or learned threshold must never
resurrect an entry that another replica evicted or purged in between.
"""

# Store with expiry reclaim and eviction, atomically.
# KEYS: entry, lfu zset, expiry zset, sizes hash, bytes counter, stream
# ARGV: id, query, response, embedding, created, params, size, ttl_ms (0 = none), now_ms,
#       max_entries, max_bytes, scope, stream maxlen, reclaim limit, lfu score,
#       group (judged-equivalent answers share one; "" = none), answer embedding ("" = none)
STORE_SCRIPT = """
local id, scope = ARGV[1], ARGV[12]
local now, ttl = tonumber(ARGV[9]), tonumber(ARGV[8])
local removed = {}
local function forget(victim)
  local s = redis.call('HGET', KEYS[4], victim)
  if s then redis.call('DECRBY', KEYS[5], s) end
  redis.call('HDEL', KEYS[4], victim)
  redis.call('ZREM', KEYS[2], victim)
  redis.call('ZREM', KEYS[3], victim)
  redis.call('UNLINK', scope .. ':e:' .. victim)
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[13], '*', 'op', 'del', 'scope', scope, 'id', victim)
  table.insert(removed, victim)
end
for _, victim in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[14]))) do
  forget(victim)
end
redis.call('HSET', KEYS[1], 'scope', scope, 'query', ARGV[2], 'response', ARGV[3], 'embedding', ARGV[4],
  'created', ARGV[5], 'params', ARGV[6], 'hits', 0, 'tau', -1)
if ARGV[16] and ARGV[16] ~= '' then redis.call('HSET', KEYS[1], 'group', ARGV[16]) end
if ARGV[17] and ARGV[17] ~= '' then redis.call('HSET', KEYS[1], 'answer_embedding', ARGV[17]) end
redis.call('HSET', KEYS[4], id, ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[15], id)
local total = redis.call('INCRBY', KEYS[5], ARGV[7])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[3], now + ttl, id)
  -- the scope's bookkeeping outlives its last entry a little, then goes too
  for i = 2, 5 do redis.call('PEXPIRE', KEYS[i], ttl + 60000) end
end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[13], '*', 'op', 'add', 'scope', scope, 'id', id)
local max_entries, max_bytes = tonumber(ARGV[10]), tonumber(ARGV[11])
while redis.call('ZCARD', KEYS[2]) > max_entries or tonumber(redis.call('GET', KEYS[5]) or '0') > max_bytes do
  local victims = redis.call('ZRANGE', KEYS[2], 0, 1)
  local victim = victims[1]
  if victim == id then victim = victims[2] end
  if not victim then break end
  forget(victim)
end
return removed
"""

# KEYS: entry; ARGV: similarity -> tau = max(tau, similarity) if the entry still exists
TAU_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local tau = tonumber(redis.call('HGET', KEYS[1], 'tau') or '-1')
  if tonumber(ARGV[1]) > tau then redis.call('HSET', KEYS[1], 'tau', ARGV[1]) end
end
return 0
"""


# KEYS: entry, lfu zset; ARGV: id, hits. Counts only entries that still exist: an entry evicted or
# purged since the hit must not be resurrected as a stray hash or zset member.
HIT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'hits', ARGV[2])
  redis.call('ZADD', KEYS[2], 'XX', 'INCR', ARGV[2], ARGV[1])
end
return 0
"""


# KEYS: entries; returns each one's learned threshold, or nil where the entry no longer exists
VALIDATE_SCRIPT = """
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('HGET', k, 'tau') or false  -- a nil would end the Lua array
end
return out
"""
