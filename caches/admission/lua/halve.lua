-- One step of the sketch's aging: halve the next slice of the pass in progress, if one is owed.
-- KEYS: 1 sketch, 2 climber hash (it holds the aging state: record.lua bumps 'agings' in the same
--   call that decides a halving, so the epoch owed is never lost with a reply).
-- ARGV: sketch bytes (width x depth / 2), slice bytes, most halvings owed (4: a 4-bit counter is 0
--   after 4).
-- State, in the climber hash: 'agings' epochs owed, 'aged' epochs done, 'aging_at' the next byte
-- of the pass in progress. A call halves the bytes from 'aging_at' and moves it on, in the same
-- atomic call: a call whose reply was lost is never halved again by the retry, which takes the
-- next slice (or finds nothing owed), and any replica's call continues the pass.
-- Returns 1 while a slice is left to halve after this call, 0 when the sketch is caught up.
local H = KEYS[2]
local total, chunk, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local owed = tonumber(redis.call('HGET', H, 'agings') or '0')
local aged = tonumber(redis.call('HGET', H, 'aged') or '0')
if aged >= owed then return 0 end
local at = tonumber(redis.call('HGET', H, 'aging_at') or '0')
-- A sketch more passes behind than `most` (its halvings postponed through a long outage) needs
-- only `most`: more leave every counter 0 all the same. Only between passes: one in progress ends.
if at == 0 and owed - aged > most then aged = owed - most end
if at < total then
  local last = math.min(total, at + chunk) - 1
  local s = redis.call('GETRANGE', KEYS[1], at, last)
  if #s > 0 then
    -- each byte holds two 4-bit counters: (b >> 1) & 0x77 halves both
    local map = {}
    for b = 0, 255 do map[string.char(b)] = string.char(bit.band(bit.rshift(b, 1), 0x77)) end
    redis.call('SETRANGE', KEYS[1], at, (string.gsub(s, '[%z\1-\255]', map)))
  end
  at = last + 1
end
if at >= total then
  aged, at = aged + 1, 0
end
redis.call('HSET', H, 'aged', aged, 'aging_at', at)
if aged < owed then return 1 end
return 0
