-- RAM values the placement does not hold: a value whose key is in no region of the policy (the
-- admit script's reply was lost after it evicted the key, so nobody deleted the value; it would
-- sit in RAM outside the budget until its TTL). Checked and, with ARGV[1] = '1', deleted in one
-- atomic call, its size given back to the RAM tier's books (as tiers/redis.py's delete does).
-- KEYS: 1 the policy's region hash, 2 the tier's sizes hash, 3 the tier's byte total, then each
--   value's Redis name (this group's slot). ARGV: 1 '1' delete / '0' only list, then each
--   value's key as the policy names it, in KEYS' order.
-- Returns the keys found without a region (deleted, when asked).
local delete = ARGV[1] == '1'
local out = {}
for i = 2, #ARGV do
  local key, name = ARGV[i], KEYS[2 + i]
  if redis.call('HEXISTS', KEYS[1], key) == 0 and redis.call('EXISTS', name) == 1 then
    out[#out + 1] = key
    if delete then
      redis.call('DEL', name)
      local size = redis.call('HGET', KEYS[2], name)
      if size then
        redis.call('HDEL', KEYS[2], name)
        redis.call('DECRBY', KEYS[3], size)
      end
    end
  end
end
return out
