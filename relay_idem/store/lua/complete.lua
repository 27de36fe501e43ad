-- KEYS[1] - record key
-- ARGV[1] - owner token
-- ARGV[2] - completed record (msgpack)
-- ARGV[3] - record ttl in milliseconds
-- ARGV[4] - channel that wakes waiting repeats
-- returns 1 if stored, 0 if the key belongs to another owner or holds another outcome.
-- A key whose lease ran out and that nobody claimed since is stored: no newer owner exists,
-- and keeping the outcome is what stops a retry from executing a second time.
-- A key that already holds this very record returns 1: the write is being retried after a
-- failure that came after Redis had run it (a timeout, a connection lost before the reply).
local current = redis.call('hmget', KEYS[1], 't', 'd')
if current[2] and current[1] ~= ARGV[1] then
    if not current[1] and current[2] == ARGV[2] then
        return 1
    end
    return 0
end
redis.call('del', KEYS[1])
redis.call('hset', KEYS[1], 'd', ARGV[2])
redis.call('pexpire', KEYS[1], ARGV[3])
redis.call('publish', ARGV[4], KEYS[1])
return 1
