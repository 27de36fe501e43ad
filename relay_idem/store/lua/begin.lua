-- KEYS[1] - record key
-- ARGV[1] - in-progress record (msgpack)
-- ARGV[2] - owner token
-- ARGV[3] - lock ttl in milliseconds
-- returns false if the key is now claimed by ARGV[2],
-- else {owner token or false (completed), record} of what the key already holds
local existing = redis.call('hmget', KEYS[1], 't', 'd')
if existing[2] then
    return existing
end
redis.call('hset', KEYS[1], 't', ARGV[2], 'd', ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[3])
return false
