-- Create the epoch when there is none (Redis started over empty) and make sure the seq
-- counter is not below what this node has already seen, so that seqs keep increasing on
-- connections that stayed open across the restart. Returns {epoch, seq}.
local P = ARGV[1]
local cur = redis.call('GET', P .. 'epoch')
if not cur then
  cur = ARGV[2]
  redis.call('SET', P .. 'epoch', cur)
end
if tonumber(redis.call('GET', P .. 'seq') or '0') < tonumber(ARGV[3]) then
  redis.call('SET', P .. 'seq', ARGV[3])
end
return {cur, redis.call('GET', P .. 'seq') or '0'}
