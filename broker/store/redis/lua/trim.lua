-- Age retention of one topic: drop the oldest members while older than the cutoff (ms).
local P, topic, cutoff = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = P .. 'h:' .. topic
local removed, top, young = 0, nil, false
while not young do
  local batch = redis.call('ZRANGE', key, removed, removed + 99)
  if #batch == 0 then break end
  for _, m in ipairs(batch) do
    local seq, ts = string.match(m, '^(%d+) (%d+) ')
    if tonumber(ts) >= cutoff then young = true break end
    removed, top = removed + 1, seq
  end
end
if removed > 0 then
  redis.call('ZREMRANGEBYRANK', key, 0, removed - 1)
  if tonumber(top) > tonumber(redis.call('HGET', P .. 'trimmed', topic) or '0') then
    redis.call('HSET', P .. 'trimmed', topic, top)
  end
end
return removed
