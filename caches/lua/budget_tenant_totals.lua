local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {redis.call('HLEN', KEYS[1]), tonumber(redis.call('GET', KEYS[4]) or '0'),
        first[2] and math.floor(tonumber(first[2])) or -1, tonumber(redis.call('GET', KEYS[5]) or '-1')}
