-- Name the history and keep the seq counter above everything this node has seen.
-- ARGV: prefix, a fresh epoch, floor (the highest seq this node assigned or saw), the
-- epoch this node knows ('' at start), '1' when this node found the stream rewritten
-- under it (the entry at its position is not the one it read) whatever the counter, and
-- the gap (seqs left between the old history and a new one).
-- The key "server" holds the run_id of the Redis server that has been serving the epoch.
-- A run_id is new at every start of redis-server, so another one here means that this
-- data was loaded from disk (a restart from an RDB snapshot or an AOF) or replicated from
-- another server (a failover): it may be older than what nodes handed out, and a node
-- that starts now has nothing to compare it with.
-- * no epoch in Redis (it started over empty): the fresh epoch becomes the history's name;
-- * the epoch this node knows but a counter below its floor, or a rewritten stream (Redis
--   came back older: an earlier snapshot, a failover to a lagging replica): history went
--   back, so the fresh epoch replaces it, and no (epoch, seq) pair is handed out twice;
-- * another server than the recorded one (or none recorded): history may have gone back;
--   the fresh epoch replaces it all the same. The first node to run this on the new
--   server records it, so the others only learn the new epoch: one new epoch per change.
-- * in every case the counter is raised to the floor: seqs keep increasing for clients
--   that resume without an epoch. A new epoch that replaces one starts the gap above the
--   counter and the floor: other nodes may have seen seqs this one had not; they must not
--   be handed out again under the new epoch either.
-- Returns {epoch, counter before, top of the stream, 0 | 1 (started over) | 2 (went back)
-- | 3 (another server), counter after, the server recorded before ('' when none), the
-- server now, the epoch before ('' when none)}.
local P, fresh, floor, known = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local rewritten = ARGV[5] == '1'
local gap = tonumber(ARGV[6])
local here = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local server = redis.call('GET', P .. 'server') or ''
local cur = redis.call('GET', P .. 'epoch')
local seq = tonumber(redis.call('GET', P .. 'seq') or '0')
local top = redis.call('XREVRANGE', P .. 'log', '+', '-', 'COUNT', 1)[1]
top = top and string.match(top[1], '^(%d+)') or '0'
local before = cur or ''
local renewed = 0
if not cur then
  renewed = 1
elseif cur == known and (seq < floor or rewritten) then
  renewed = 2
elseif server ~= here then
  renewed = 3
end
if renewed > 0 then
  cur = fresh
  redis.call('SET', P .. 'epoch', cur)
end
if server ~= here then
  redis.call('SET', P .. 'server', here)
end
local after = math.max(seq, floor)
if renewed > 1 or (renewed == 1 and floor > 0) then
  after = after + gap
end
if after > seq then
  redis.call('SET', P .. 'seq', after)
end
return {cur, seq, top, renewed, after, server, here, before}
