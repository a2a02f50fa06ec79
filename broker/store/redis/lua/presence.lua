-- ARGV: prefix, topic, this node. Returns (user, name, connections) of live other nodes.
local P, topic, me = ARGV[1], ARGV[2], ARGV[3]
local fields = redis.call('HGETALL', P .. 'p:' .. topic)
local alive, counts, order = {}, {}, {}
for i = 1, #fields, 2 do
  local bar = string.find(fields[i], '|', 1, true)
  local node, user = string.sub(fields[i], 1, bar - 1), string.sub(fields[i], bar + 1)
  if node ~= me then
    if alive[node] == nil then
      alive[node] = redis.call('EXISTS', P .. 'node:' .. node) == 1
    end
    if alive[node] then
      if counts[user] == nil then
        counts[user] = 0
        table.insert(order, user)
      end
      counts[user] = counts[user] + tonumber(fields[i + 1])
    end
  end
end
local out = {}
for _, user in ipairs(order) do
  table.insert(out, user)
  table.insert(out, redis.call('HGET', P .. 'pn:' .. topic, user) or user)
  table.insert(out, counts[user])
end
return out
