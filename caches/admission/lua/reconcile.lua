-- Forget keys whose value is gone (expired by TTL) though no read came to tell: the same as
-- remove.lua for each, checked and forgotten in one atomic call (a value written again
-- meanwhile, by any replica, keeps its entry).
-- KEYS: the ten policy keys (common.lua), then the Redis name of each key's value, in ARGV's
--   order (on a cluster: under this group's hash tag, so the whole call is one slot).
-- ARGV: common (5), settled tick, then keys -> {how many were forgotten, the current tick}.
-- Only entries last placed or moved at or before the settled tick (a tick the caller saw a
-- while ago) are forgotten: admit.lua places a key before the cache writes its value, and an
-- entry forgotten in that gap would leave its value in RAM where no eviction ever finds it.
local settled = tonumber(ARGV[6])
-- The tick went backwards: the metadata was emptied (a restart, a reset), nothing is settled.
if settled > tick then settled = 0 end
local n = 0
for i = 7, #ARGV do
  local key = ARGV[i]
  local region = redis.call('HGET', R, key)
  if region and redis.call('EXISTS', KEYS[4 + i]) == 0 then
    local at = tonumber(redis.call('ZSCORE', ZS[region], key) or '0')
    if at <= settled then
      forget(key, region)
      n = n + 1
    end
  end
end
return {n, tick}
