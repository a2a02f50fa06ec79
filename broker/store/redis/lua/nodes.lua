-- ARGV: prefix. Returns (node, figures JSON) of every live node.
local P = ARGV[1]
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  local v = redis.call('GET', P .. 'node:' .. node)
  if v then
    table.insert(out, node)
    table.insert(out, v)
  end
end
return out
