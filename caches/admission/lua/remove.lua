-- Forget keys. ARGV: common (5), then keys -> how many were placed
local n = 0
for i = 6, #ARGV do
  local region = redis.call('HGET', R, ARGV[i])
  if region then forget(ARGV[i], region); n = n + 1 end
end
return n
