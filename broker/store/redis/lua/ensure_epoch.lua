-- Name the history and keep the seq counter above everything this node has seen.
-- ARGV: prefix, a fresh epoch, floor (the highest seq this node assigned or saw), the
-- epoch this node knows ('' at start), '1' when this node found the stream rewritten
-- under it (the entry at its position is not the one it read) whatever the counter.
-- * no epoch in Redis (it started over empty): the fresh epoch becomes the history's name;
-- * the epoch this node knows but a counter below its floor, or a rewritten stream (Redis
--   came back older: an earlier snapshot, a failover to a lagging replica): history went
--   back, so the fresh epoch replaces it, and no (epoch, seq) pair is handed out twice;
-- * in every case the counter is raised to the floor: seqs keep increasing for clients
--   that resume without an epoch.
-- Returns {epoch, counter before, top of the stream, 0 | 1 (started over) | 2 (went back)}.
local P, fresh, floor, known = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local rewritten = ARGV[5] == '1'
local cur = redis.call('GET', P .. 'epoch')
local seq = tonumber(redis.call('GET', P .. 'seq') or '0')
local top = redis.call('XREVRANGE', P .. 'log', '+', '-', 'COUNT', 1)[1]
top = top and string.match(top[1], '^(%d+)') or '0'
local renewed = 0
if not cur then
  cur, renewed = fresh, 1
  redis.call('SET', P .. 'epoch', cur)
elseif cur == known and (seq < floor or rewritten) then
  cur, renewed = fresh, 2
  redis.call('SET', P .. 'epoch', cur)
end
if seq < floor then
  redis.call('SET', P .. 'seq', floor)
end
return {cur, seq, top, renewed}
