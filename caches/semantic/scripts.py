"""The semantic store's Lua scripts, each run atomically by Redis.

Why Lua: store, expiry reclaim and eviction must happen in one step, so the entry and byte
budgets hold with many replicas writing at once, and a hit count or learned threshold must never
resurrect an entry that another replica evicted or purged in between.
"""

from caches.budget import BUDGET_LUA

# Store with expiry reclaim and eviction under the tenant's and the global budgets, atomically
# (:mod:`caches.budget`). An entry is accounted under its key in the budget bookkeeping (its tenant
# is read from it) and listed by id in its scope's ``:lfu`` zset (what a mirror loads) and
# ``:bytes`` counter (stats). A victim may be in any scope of the tenant (or, over the global
# budget, of the biggest tenant): the reply lists every removed entry as scope, id pairs.
# KEYS: entry, scope lfu zset, scope bytes counter, stream
# ARGV: id, query, response, embedding, created, params, size, ttl_ms (0 = none), now_ms,
#       budget prefix, scope, stream maxlen, reclaim limit, lfu score,
#       tenant entries, tenant bytes, global entries, global bytes (-1 = unbounded)
STORE_SCRIPT = BUDGET_LUA + """
local id, P, scope = ARGV[1], ARGV[10], ARGV[11]
local now, ttl = tonumber(ARGV[9]), tonumber(ARGV[8])
local removed = {}
local function forget(member)
  local s_scope, victim = string.match(member, '^(.*):e:([^:]+)$')
  local size = bk_forget(P, member)
  redis.call('UNLINK', member)
  if not s_scope then return end
  if redis.call('ZREM', s_scope .. ':lfu', victim) == 1 then
    if redis.call('EXISTS', s_scope .. ':lfu') == 1 then redis.call('DECRBY', s_scope .. ':bytes', size)
    else redis.call('DEL', s_scope .. ':bytes') end
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[12], '*', 'op', 'del', 'scope', s_scope, 'id', victim)
  table.insert(removed, s_scope)
  table.insert(removed, victim)
end
bk_reclaim(P, now, tonumber(ARGV[13]), forget)
redis.call('HSET', KEYS[1], 'scope', scope, 'query', ARGV[2], 'response', ARGV[3], 'embedding', ARGV[4],
  'created', ARGV[5], 'params', ARGV[6], 'hits', 0, 'tau', -1)
if ARGV[19] and ARGV[19] ~= '' then redis.call('HSET', KEYS[1], 'group', ARGV[19]) end
if ARGV[20] and ARGV[20] ~= '' then redis.call('HSET', KEYS[1], 'answer_embedding', ARGV[20]) end
redis.call('ZADD', KEYS[2], ARGV[14], id)
redis.call('INCRBY', KEYS[3], ARGV[7])
local t = bk_add(P, KEYS[1], tonumber(ARGV[7]), ttl > 0 and now + ttl or 0, tonumber(ARGV[14]))
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  -- the scope's index outlives its last entry a little, then goes too
  redis.call('PEXPIRE', KEYS[2], ttl + 60000)
  redis.call('PEXPIRE', KEYS[3], ttl + 60000)
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[12], '*', 'op', 'add', 'scope', scope, 'id', id)
local L = {tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18])}
bk_enforce(P, t, KEYS[1], L, forget)
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


# KEYS: entry, scope lfu zset, tenant rank zset; ARGV: id, hits. Counts only entries that still
# exist: an entry evicted or purged since the hit must not be resurrected as a stray hash or member.
HIT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'hits', ARGV[2])
  redis.call('ZADD', KEYS[2], 'XX', 'INCR', ARGV[2], ARGV[1])
  redis.call('ZADD', KEYS[3], 'XX', 'INCR', ARGV[2], KEYS[1])
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
