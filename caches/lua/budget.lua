local BK_SIZES, BK_EXPIRY, BK_RANK, BK_BYTES, BK_SEQ = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local bk_dbytes, bk_dentries, bk_evicted = 0, 0, 0
local function bk_over(limit, value) return limit >= 0 and value > limit end

-- Forget an entry's accounting; returns the bytes it counted (0 when it was not accounted).
local function bk_forget(member)
  redis.call('ZREM', BK_EXPIRY, member)
  redis.call('ZREM', BK_RANK, member)
  local s = redis.call('HGET', BK_SIZES, member)
  if not s then return 0 end
  s = tonumber(s)
  redis.call('HDEL', BK_SIZES, member)
  if redis.call('HLEN', BK_SIZES) == 0 then redis.call('DEL', BK_BYTES)
  else redis.call('DECRBY', BK_BYTES, s) end
  bk_dbytes, bk_dentries = bk_dbytes - s, bk_dentries - 1
  return s
end

-- Account a new entry (an overwrite gives its old bytes back first).
local function bk_add(member, size, expiry_ms, rank)
  bk_forget(member)
  redis.call('HSET', BK_SIZES, member, size)
  if expiry_ms > 0 then redis.call('ZADD', BK_EXPIRY, expiry_ms, member) end
  redis.call('ZADD', BK_RANK, rank, member)
  redis.call('INCRBY', BK_BYTES, size)
  bk_dbytes, bk_dentries = bk_dbytes + size, bk_dentries + 1
end

-- Expired entries (Redis dropped them silently) given back, at most `limit`.
local function bk_reclaim(now_ms, limit, forget)
  local expired = redis.call('ZRANGEBYSCORE', BK_EXPIRY, '-inf', now_ms, 'LIMIT', 0, limit)
  for _, m in ipairs(expired) do forget(m) end
  return #expired
end

local function bk_lowest(exclude)
  local c = redis.call('ZRANGE', BK_RANK, 0, 1)
  if c[1] == exclude then return c[2] end
  return c[1]
end

-- Evict until the tenant's own budget holds (L: tenant entries, tenant bytes; -1 = unbounded).
local function bk_enforce(exclude, L, forget)
  while bk_over(L[1], redis.call('ZCARD', BK_RANK))
      or bk_over(L[2], tonumber(redis.call('GET', BK_BYTES) or '0')) do
    local v = bk_lowest(exclude)
    if not v then return end
    forget(v)
    bk_evicted = bk_evicted + 1
  end
end

-- Evict the lowest entries until `entries` are gone and `bytes` freed (the global budget's share).
local function bk_shrink(exclude, entries, bytes, forget)
  local gone, freed = 0, 0
  while gone < entries or freed < bytes do
    local v = bk_lowest(exclude)
    if not v then return end
    local before = bk_dbytes
    forget(v)
    gone, freed = gone + 1, freed + before - bk_dbytes
    bk_evicted = bk_evicted + 1
  end
end

-- What every script returns first: byte and entry deltas, the earliest expiry left (-1: none),
-- evictions, then the tenant's totals *after* this script (bytes, entries) and a sequence number
-- that orders this report among the tenant's; then the script's own values. The ledger keeps the
-- totals of the newest report it saw, so a report that never reached it (a client that timed out
-- after the script ran) is made good by the tenant's next one. A lost sequence key restarts from
-- the server's clock in microseconds: above any number it gave before (fewer than a million
-- scripts a second per tenant), and still exact as a Lua number (below 2^53).
local function bk_report(extra)
  local first = redis.call('ZRANGE', BK_EXPIRY, 0, 0, 'WITHSCORES')
  if redis.call('EXISTS', BK_SEQ) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', BK_SEQ, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  end
  local out = {bk_dbytes, bk_dentries, first[2] and math.floor(tonumber(first[2])) or -1, bk_evicted,
               tonumber(redis.call('GET', BK_BYTES) or '0'), redis.call('HLEN', BK_SIZES),
               redis.call('INCR', BK_SEQ)}
  for _, v in ipairs(extra or {}) do out[#out + 1] = v end
  return out
end
