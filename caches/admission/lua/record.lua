-- Record one batch of reads (sketch, LRU order, probation -> protected, climber).
-- ARGV: common (5), sample, adaptive 0/1, climb sample, climb step, step decay, restart threshold,
--   max window, min window, fetch 0/1, then keys: with fetch=1 the script GETs each key itself (its
--   Redis name is KEYS[10 + i] for the i-th key: on a cluster, the RAM tier's hash-tagged name; the
--   RAM read and the access record in one round trip) and returns {aged, value or nil...}; with
--   fetch=0 (key, hit 0/1) pairs and returns {aged}.
local sample, adaptive = tonumber(ARGV[6]), ARGV[7] == '1'
local csample, cstep, cdecay, crestart, maxw = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local pcap = math.floor(mcap * pfrac)
local minw = tonumber(ARGV[13])
local fetch = ARGV[14] == '1'
local stride = 2
if fetch then stride = 1 end
local incr = {'OVERFLOW', 'SAT'}
local out = {0}
local n, nhits = 0, 0
local j = 10
for i = 15, #ARGV, stride do
  local key, hit = ARGV[i], ARGV[i + 1]
  if fetch then
    -- the value's Redis name is declared in KEYS (after the ten policy keys), in ARGV's order
    j = j + 1
    local v = redis.call('GET', KEYS[j])
    out[#out + 1] = v
    if v then hit = '1' else hit = '0' end
  end
  n = n + 1
  if hit == '1' then nhits = nhits + 1 end
  for _, o in ipairs(offsets(key)) do
    incr[#incr + 1] = 'INCRBY'; incr[#incr + 1] = 'u4'; incr[#incr + 1] = '#' .. o; incr[#incr + 1] = 1
  end
  local region = redis.call('HGET', R, key)
  if region then
    if hit == '0' then
      forget(key, region)
    elseif region == 'p' then
      local size = tonumber(redis.call('HGET', S, key))
      redis.call('ZREM', P, key)
      redis.call('ZADD', Q, nexttick(), key)
      redis.call('HSET', R, key, 'q')
      redis.call('HINCRBY', B, 'p', -size)
      local bq = redis.call('HINCRBY', B, 'q', size)
      while bq > pcap do
        local old = redis.call('ZRANGE', Q, 0, 0)[1]
        if not old then break end
        local osize = tonumber(redis.call('HGET', S, old))
        redis.call('ZREM', Q, old)
        redis.call('ZADD', P, nexttick(), old)
        redis.call('HSET', R, old, 'p')
        bq = redis.call('HINCRBY', B, 'q', -osize)
        redis.call('HINCRBY', B, 'p', osize)
      end
    else
      redis.call('ZADD', ZS[region], nexttick(), key)
    end
  end
end
redis.call('SET', T, tick)
if adaptive and n > 0 then
  local reads = redis.call('HINCRBY', H, 'reads', n)
  local hits = redis.call('HINCRBY', H, 'hits', nhits)
  if reads >= csample then
    local window = tonumber(redis.call('HGET', H, 'window') or ARGV[4])
    local step = tonumber(redis.call('HGET', H, 'step') or tostring(cstep))
    local prev = tonumber(redis.call('HGET', H, 'prev') or '0')
    local rate = hits / reads
    local change = rate - prev
    local amount = step
    if change < 0 then amount = -step end
    if math.abs(change) >= crestart then
      if amount >= 0 then step = cstep else step = -cstep end
    else
      step = cdecay * amount
    end
    window = math.min(maxw, math.max(minw, window + amount))
    redis.call('HSET', H, 'window', tostring(window), 'step', tostring(step), 'prev', tostring(rate), 'reads', 0, 'hits', 0)
  end
end
if n > 0 then redis.call('BITFIELD', C, unpack(incr)) end
local adds = redis.call('INCRBY', A, n)
if adds >= sample then
  redis.call('SET', A, math.floor(adds / 2))
  -- the halving owed, recorded with the decision: lua/halve.lua does it slice by slice, and any
  -- replica's upkeep finishes it when this reply, or a slice's, is lost
  redis.call('HINCRBY', H, 'agings', 1)
  out[1] = 1
end
return out
