local P = ARGV[1]
local cur = redis.call('GET', P .. 'epoch')
if cur ~= ARGV[2] then
  return redis.error_reply('EPOCH ' .. tostring(cur))
end
local history = tonumber(ARGV[3])
local node = ARGV[5]
local n = tonumber(ARGV[6])
local last = redis.call('INCRBY', P .. 'seq', n)
local first = last - n + 1
local touched = {}
for i = 0, n - 1 do
  local a = 7 + i * 4
  local topic = ARGV[a]
  local seq = tostring(first + i)
  local member = seq .. ' ' .. ARGV[a + 1]
  redis.call('ZADD', P .. 'h:' .. topic, seq, member)
  if not touched[topic] then
    touched[topic] = true
    redis.call('SADD', P .. 'topics', topic)
  end
  -- One field: "<node> <session> <echo> <len(topic)>" LF topic member (see RedisStore._entry)
  redis.call('XADD', P .. 'log', 'MAXLEN', '~', ARGV[4], seq .. '-1', 'm',
    node .. ' ' .. ARGV[a + 2] .. ' ' .. ARGV[a + 3] .. ' ' .. #topic .. '\\n' .. topic .. member)
end
for topic in pairs(touched) do
  local key = P .. 'h:' .. topic
  local extra = redis.call('ZCARD', key) - history
  if extra > 0 then
    local top = redis.call('ZRANGE', key, extra - 1, extra - 1, 'WITHSCORES')[2]
    redis.call('ZREMRANGEBYRANK', key, 0, extra - 1)
    if tonumber(top) > tonumber(redis.call('HGET', P .. 'trimmed', topic) or '0') then
      redis.call('HSET', P .. 'trimmed', topic, top)
    end
  end
end
return last
