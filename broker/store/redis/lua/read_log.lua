-- What a follower at seq ARGV[2] reads next. ARGV: prefix, position, count.
-- Returns {epoch, seq counter, mark, trimmed, entries}:
-- mark: the SHA-1 of the entry at the position ('' when there is none), so that the node
-- can tell the stream it follows was rewritten under it (Redis came back older and seqs
-- were handed out again); trimmed: 1 when the stream no longer reaches back to the
-- position (the cap removed it); entries: the entries after the position (at most count),
-- concatenated as "<len>:<m field>"...
local P, pos = ARGV[1], ARGV[2]
local key = P .. 'log'
local at = redis.call('XRANGE', key, pos .. '-1', pos .. '-1')[1]
local mark = at and redis.sha1hex(at[2][2]) or ''
local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
local trimmed = 0
if first and tonumber(string.match(first[1], '^(%d+)')) > tonumber(pos) then trimmed = 1 end
local entries = redis.call('XRANGE', key, '(' .. pos .. '-1', '+', 'COUNT', ARGV[3])
local out = {}
for i, e in ipairs(entries) do
  out[i] = #e[2][2] .. ':' .. e[2][2]
end
return {redis.call('GET', P .. 'epoch') or '', redis.call('GET', P .. 'seq') or '0', mark,
  trimmed, table.concat(out)}
