-- KEYS[1] - record key
-- ARGV[1] - owner token
-- ARGV[2] - lock ttl in milliseconds
-- returns 1 if the lease was extended, 0 if the claim was not ours
if redis.call('hget', KEYS[1], 't') ~= ARGV[1] then
    return 0
end
return redis.call('pexpire', KEYS[1], ARGV[2])
