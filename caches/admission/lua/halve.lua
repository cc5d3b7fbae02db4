-- Halve a slice of the sketch: each byte holds two 4-bit counters, (b >> 1) & 0x77 halves both.
-- KEYS: 1 sketch. ARGV: first byte, last byte (inclusive).
local s = redis.call('GETRANGE', KEYS[1], ARGV[1], ARGV[2])
if #s == 0 then return 0 end
local map = {}
for b = 0, 255 do map[string.char(b)] = string.char(bit.band(bit.rshift(b, 1), 0x77)) end
local halved = string.gsub(s, '[%z\1-\255]', map)
redis.call('SETRANGE', KEYS[1], ARGV[1], halved)
return #s
