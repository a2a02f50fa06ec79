-- One group commit. ARGV: prefix, epoch, history, stream maxlen, node, n, dedupe window
-- (ms), floor (the highest seq this node assigned or saw), then per draft: topic, tail, session, echo, key id ('' without a key), group;
-- then pairs of topic, history for the topics that keep another number than `history`
-- (their namespace's, docs/operations.md "Namespaces and public topics").
-- A keyed publish (its first draft has the key id and the number of drafts it spans)
-- whose key is already stored (k:<key id>, expiring after the window), or used earlier in
-- this batch, is skipped: nothing is recorded for it. Returns {last seq (0 when nothing
-- was recorded), then per skipped publish: the index of its first draft (0-based), the
-- seqs of the first publish with that key ("12,13")}.
local P = ARGV[1]
local cur = redis.call('GET', P .. 'epoch')
if cur ~= ARGV[2] then
  return redis.error_reply('EPOCH ' .. tostring(cur))
end
-- Another Redis server than the one that has been serving this epoch (recorded by
-- ensure_epoch): a restart that loaded a snapshot or an AOF, or a failover. Its data may
-- be older than what was handed out; the node runs ensure_epoch, which starts a new epoch.
local here = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', P .. 'server') ~= here then
  return redis.error_reply('SERVER ' .. here)
end
-- A counter below what this node already saw: Redis came back older (an earlier snapshot,
-- a lagging replica). Handing out these seqs again would give two messages one name.
local counter = tonumber(redis.call('GET', P .. 'seq') or '0')
if counter < tonumber(ARGV[8]) then
  return redis.error_reply('BEHIND ' .. counter)
end
local history = tonumber(ARGV[3])
local node = ARGV[5]
local n = tonumber(ARGV[6])
local window = ARGV[7]
local limits = {}
for k = 9 + n * 6, #ARGV - 1, 2 do
  limits[ARGV[k]] = tonumber(ARGV[k + 1])
end
local touched = {}
local seen = {}
local out = {0}
local i = 0
while i < n do
  local a = 9 + i * 6
  local kid = ARGV[a + 4]
  local size = math.max(tonumber(ARGV[a + 5]), 1)
  local prior = nil
  if kid ~= '' then
    prior = seen[kid] or redis.call('GET', P .. 'k:' .. kid)
  end
  if prior then
    table.insert(out, i)
    table.insert(out, prior)
  else
    local last = redis.call('INCRBY', P .. 'seq', size)
    local first = last - size + 1
    local seqs = {}
    for j = 0, size - 1 do
      local b = a + j * 6
      local topic = ARGV[b]
      local seq = tostring(first + j)
      seqs[j + 1] = seq
      local member = seq .. ' ' .. ARGV[b + 1]
      redis.call('ZADD', P .. 'h:' .. topic, seq, member)
      if not touched[topic] then
        touched[topic] = true
        redis.call('SADD', P .. 'topics', topic)
      end
      -- One field: "<node> <session> <echo> <len(topic)>" LF topic member (see RedisStore._entry)
      redis.call('XADD', P .. 'log', 'MAXLEN', '~', ARGV[4], seq .. '-1', 'm',
        node .. ' ' .. ARGV[b + 2] .. ' ' .. ARGV[b + 3] .. ' ' .. #topic .. '\n' .. topic .. member)
    end
    if kid ~= '' then
      local joined = table.concat(seqs, ',')
      seen[kid] = joined
      redis.call('SET', P .. 'k:' .. kid, joined, 'PX', window)
    end
    out[1] = last
  end
  i = i + size
end
for topic in pairs(touched) do
  local key = P .. 'h:' .. topic
  local extra = redis.call('ZCARD', key) - (limits[topic] or history)
  if extra > 0 then
    local top = redis.call('ZRANGE', key, extra - 1, extra - 1, 'WITHSCORES')[2]
    redis.call('ZREMRANGEBYRANK', key, 0, extra - 1)
    if tonumber(top) > tonumber(redis.call('HGET', P .. 'trimmed', topic) or '0') then
      redis.call('HSET', P .. 'trimmed', topic, top)
    end
  end
end
return out
