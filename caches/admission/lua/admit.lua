-- Place candidates: window first, then the TinyLFU duel for main.
-- ARGV: common (5), then (key, size) pairs -> evicted keys
local evicted = {}
for i = 6, #ARGV, 2 do
  local key, size = ARGV[i], tonumber(ARGV[i + 1])
  if not redis.call('HGET', R, key) then
    redis.call('ZADD', W, nexttick(), key)
    redis.call('HSET', R, key, 'w')
    redis.call('HSET', S, key, size)
    local bw = redis.call('HINCRBY', B, 'w', size)
    while bw > wcap do
      local cand = redis.call('ZRANGE', W, 0, 0)[1]
      if not cand then break end
      local csize = forget(cand, 'w')
      bw = bw - csize
      if csize > mcap then
        evicted[#evicted + 1] = cand
      else
        local cfreq = nil
        while true do
          if bytes('p') + bytes('q') + csize <= mcap then
            redis.call('ZADD', P, nexttick(), cand)
            redis.call('HSET', R, cand, 'p')
            redis.call('HSET', S, cand, csize)
            redis.call('HINCRBY', B, 'p', csize)
            break
          end
          local victim, vregion = main_victim()
          if not victim then evicted[#evicted + 1] = cand; break end
          cfreq = cfreq or freq(cand)
          if cfreq > freq(victim) then
            forget(victim, vregion)
            evicted[#evicted + 1] = victim
          else
            evicted[#evicted + 1] = cand
            break
          end
        end
      end
    end
    -- the window grew (climber): main gives the room back, oldest probation first
    while bytes('w') + bytes('p') + bytes('q') > budget do
      local victim, vregion = main_victim()
      if not victim then break end
      forget(victim, vregion)
      evicted[#evicted + 1] = victim
    end
  end
end
redis.call('SET', T, tick)
return evicted
