-- Shared by the presence scripts: change one node's count for a user on a topic and
-- publish join/leave when the user's cluster-wide total leaves or reaches zero.
local P = ARGV[1]
-- The join/leave this script published, returned to the node that ran it: that node alone
-- reports them to the application's backend (hook events), so each goes out once.
local CHANGES = {}
local function set_count(node, topic, user, name, count)
  local pkey = P .. 'p:' .. topic
  local field = node .. '|' .. user
  local old = tonumber(redis.call('HGET', pkey, field) or '0')
  -- The name is written even when the count stays: a refreshed token may rename the user.
  if count > 0 then redis.call('HSET', P .. 'pn:' .. topic, user, name) end
  if count == old then return end
  if count == 0 then
    redis.call('HDEL', pkey, field)
    if redis.call('HINCRBY', P .. 'pt:' .. node, topic, -1) <= 0 then
      redis.call('HDEL', P .. 'pt:' .. node, topic)
    end
  else
    redis.call('HSET', pkey, field, count)
    if old == 0 then redis.call('HINCRBY', P .. 'pt:' .. node, topic, 1) end
  end
  local total = redis.call('HINCRBY', P .. 'pu:' .. topic, user, count - old)
  local before = total - (count - old)
  if total <= 0 then
    local shown = redis.call('HGET', P .. 'pn:' .. topic, user) or name
    redis.call('HDEL', P .. 'pu:' .. topic, user)
    redis.call('HDEL', P .. 'pn:' .. topic, user)
    if before > 0 then
      redis.call('PUBLISH', P .. 'events', cjson.encode({'leave', topic, user, shown}))
      CHANGES[#CHANGES + 1] = {'leave', topic, user, shown}
    end
  elseif before <= 0 then
    redis.call('PUBLISH', P .. 'events', cjson.encode({'join', topic, user, name}))
    CHANGES[#CHANGES + 1] = {'join', topic, user, name}
  end
end
local function sweep(node)
  for _, topic in ipairs(redis.call('HKEYS', P .. 'pt:' .. node)) do
    local fields = redis.call('HGETALL', P .. 'p:' .. topic)
    local head = node .. '|'
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, #head) == head then
        set_count(node, topic, string.sub(fields[i], #head + 1), '', 0)
      end
    end
  end
  redis.call('DEL', P .. 'pt:' .. node)
  redis.call('SREM', P .. 'nodes', node)
end
