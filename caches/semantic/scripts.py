"""The semantic store's Lua scripts, each run atomically by Redis.

Why Lua: store, expiry reclaim and eviction must happen in one step, so the entry and byte
budgets hold with many replicas writing at once, and a hit count or learned threshold must never
resurrect an entry that another replica evicted or purged in between.
"""

from caches.budget import BUDGET_LUA

# Removes an entry (the budget library's `forget`): its hash, its accounting and its scope's
# index and bytes; lists it in `removed` as scope, id (the store reports it: the stream event and
# the local mirror are the caller's). A victim may be in any scope of the tenant: they all carry
# the tenant's hash tag, so they are in the script's slot.
SEMANTIC_FORGET = """
local function forget(member)
  local s_scope, victim = string.match(member, '^(.*):e:([^:]+)$')
  local size = bk_forget(member)
  redis.call('UNLINK', member)
  if not s_scope then return end
  if redis.call('ZREM', s_scope .. ':lfu', victim) == 1 then
    if redis.call('EXISTS', s_scope .. ':lfu') == 1 then redis.call('DECRBY', s_scope .. ':bytes', size)
    else redis.call('DEL', s_scope .. ':bytes') end
  end
  table.insert(removed, s_scope)
  table.insert(removed, victim)
end
"""

# Store with expiry reclaim and eviction under the tenant's budget, atomically (the global budget
# follows through the ledger, :mod:`caches.budget`). An entry is accounted under its key in the
# tenant's books and listed by id in its scope's ``:lfu`` zset (what a mirror loads) and
# ``:bytes`` counter (stats). Returns the budget report, then every removed entry as scope, id.
# KEYS: the tenant's books (5: caches.budget.tenant_keys), entry, scope lfu zset, scope bytes counter
# ARGV: id, query, response, embedding, created, params, size, ttl_ms (0 = none), now_ms,
#       scope, reclaim limit, lfu score, tenant entries, tenant bytes (-1 = unbounded),
#       judged group ('' = none), answer embedding ('' = none)
STORE_SCRIPT = BUDGET_LUA + "local removed = {}\n" + SEMANTIC_FORGET + """
local E, LFU, SB = KEYS[6], KEYS[7], KEYS[8]
local id, scope = ARGV[1], ARGV[10]
local now, ttl = tonumber(ARGV[9]), tonumber(ARGV[8])
bk_reclaim(now, tonumber(ARGV[11]), forget)
redis.call('HSET', E, 'scope', scope, 'query', ARGV[2], 'response', ARGV[3], 'embedding', ARGV[4],
  'created', ARGV[5], 'params', ARGV[6], 'hits', 0, 'tau', -1)
if ARGV[15] and ARGV[15] ~= '' then redis.call('HSET', E, 'group', ARGV[15]) end
if ARGV[16] and ARGV[16] ~= '' then redis.call('HSET', E, 'answer_embedding', ARGV[16]) end
redis.call('ZADD', LFU, ARGV[12], id)
redis.call('INCRBY', SB, ARGV[7])
bk_add(E, tonumber(ARGV[7]), ttl > 0 and now + ttl or 0, tonumber(ARGV[12]))
if ttl > 0 then
  redis.call('PEXPIRE', E, ttl)
  -- the scope's index outlives its last entry a little, then goes too
  redis.call('PEXPIRE', LFU, ttl + 60000)
  redis.call('PEXPIRE', SB, ttl + 60000)
end
bk_enforce(E, {tonumber(ARGV[13]), tonumber(ARGV[14])}, forget)
return bk_report(removed)
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
