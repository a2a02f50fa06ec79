-- Name the history and keep the seq counter above everything this node has seen.
-- ARGV: prefix, a fresh epoch, floor (the highest seq this node assigned or saw), the
-- epoch this node knows ('' at start), '1' when this node found the stream rewritten
-- under it (the entry at its position is not the one it read) whatever the counter, and
-- the gap (seqs left between the old history and a new one).
-- * no epoch in Redis (it started over empty): the fresh epoch becomes the history's name;
-- * the epoch this node knows but a counter below its floor, or a rewritten stream (Redis
--   came back older: an earlier snapshot, a failover to a lagging replica): history went
--   back, so the fresh epoch replaces it, and no (epoch, seq) pair is handed out twice;
-- * in every case the counter is raised to the floor: seqs keep increasing for clients
--   that resume without an epoch. A new epoch after a non-zero floor starts the gap
--   above it: another node may have read seqs this one had not when Redis failed; they
--   must not be handed out again under the new epoch either.
-- Returns {epoch, counter before, top of the stream, 0 | 1 (started over) | 2 (went back),
-- counter after}.
local P, fresh, floor, known = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local rewritten = ARGV[5] == '1'
local gap = tonumber(ARGV[6])
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
local after = math.max(seq, floor)
if renewed > 0 and floor > 0 then
  after = after + gap
end
if after > seq then
  redis.call('SET', P .. 'seq', after)
end
return {cur, seq, top, renewed, after}
