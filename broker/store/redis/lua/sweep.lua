-- ARGV: prefix, node or '' — sweep that node (shutdown) or every node whose heartbeat expired.
-- Run with presence_lib.lua prepended.
if ARGV[2] ~= '' then
  redis.call('DEL', P .. 'node:' .. ARGV[2])
  sweep(ARGV[2])
  return 1
end
local swept = 0
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if redis.call('EXISTS', P .. 'node:' .. node) == 0 then
    sweep(node)
    swept = swept + 1
  end
end
return swept
