-- ARGV: prefix, node, then (topic, user, name, count) per change.
-- Run with presence_lib.lua prepended.
local node = ARGV[2]
for i = 3, #ARGV, 4 do
  set_count(node, ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]))
end
if #CHANGES == 0 then return '' end
return cjson.encode(CHANGES)
