-- KEYS[1] - record key
-- ARGV[1] - owner token
-- ARGV[2] - channel that wakes waiting repeats
-- returns 1 if the claim was deleted, 0 if it was not ours
if redis.call('hget', KEYS[1], 't') ~= ARGV[1] then
    return 0
end
redis.call('del', KEYS[1])
redis.call('publish', ARGV[2], KEYS[1])
return 1
