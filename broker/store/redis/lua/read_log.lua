-- The stream entries after ARGV[2] (at most ARGV[3]), concatenated as "<len>:<m field>"...
local entries = redis.call('XRANGE', ARGV[1] .. 'log', '(' .. ARGV[2], '+', 'COUNT', ARGV[3])
local out = {}
for i, e in ipairs(entries) do
  out[i] = #e[2][2] .. ':' .. e[2][2]
end
return table.concat(out)
