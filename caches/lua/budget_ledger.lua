local TB, TE, TX, B, E, EV, TS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local now, t = tonumber(ARGV[1]), ARGV[2]
local tb, te, earliest, seq = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[11])
-- A tenant's row takes the totals of its newest report (caches.budget: Report): an older one that
-- arrives late changes nothing, and one that never arrived is made good by the next.
if seq > tonumber(redis.call('HGET', TS, t) or '-1') then
  redis.call('HSET', TS, t, seq)
  local db = tb - tonumber(redis.call('ZSCORE', TB, t) or '0')
  local de = te - tonumber(redis.call('ZSCORE', TE, t) or '0')
  if db ~= 0 then redis.call('INCRBY', B, db) end
  if de ~= 0 then redis.call('INCRBY', E, de) end
  if te <= 0 then
    redis.call('ZREM', TB, t); redis.call('ZREM', TE, t); redis.call('ZREM', TX, t)
  else
    redis.call('ZADD', TB, tb, t); redis.call('ZADD', TE, te, t)
    if earliest >= 0 then redis.call('ZADD', TX, earliest, t) else redis.call('ZREM', TX, t) end
  end
end
if tonumber(ARGV[6]) > 0 then redis.call('INCRBY', EV, ARGV[6]) end
local function over(limit, key)
  if limit < 0 then return 0 end
  return math.max(0, tonumber(redis.call('GET', key) or '0') - limit)
end
local le, lb = tonumber(ARGV[7]), tonumber(ARGV[8])
local oe, ob = over(le, E), 0
if oe == 0 then ob = over(lb, B) end
local victim, ne, nb = false, 0, 0
if oe > 0 or ob > 0 then
  local by = TB
  if oe > 0 then by = TE end
  local top = redis.call('ZREVRANGE', by, 0, 1, 'WITHSCORES')
  if top[1] then
    victim = top[1]
    local mine = ARGV[10] ~= '' and redis.call('ZSCORE', by, ARGV[10])
    if mine and tonumber(mine) >= tonumber(top[2]) then victim = ARGV[10] end
    -- shed at most down to the next biggest tenant: max-min fairness, one level at a time
    local gap = tonumber(redis.call('ZSCORE', by, victim)) - tonumber(top[4] or '0')
    if oe > 0 then ne = math.max(1, math.min(oe, gap)) else nb = math.max(1, math.min(ob, gap)) end
  end
end
local out = {victim, ne, nb}
for _, x in ipairs(redis.call('ZRANGEBYSCORE', TX, '-inf', now, 'LIMIT', 0, tonumber(ARGV[9]))) do
  out[#out + 1] = x
end
return out
