-- Switchboard's cluster engine: every change to shared state is one call of
-- this script, so it is atomic, and a message's append and its notice to the
-- nodes (PUBLISH) can never be separated. See docs/cluster.md for the keys.
--
-- ARGV[1] is the operation. ARGV[2..5] are the same for every call:
--   2 an epoch for a stream made now (random, from the node),
--   3 how long a stream's epoch and top offset outlive its last write (ms),
--   4, 5 what the `$clients` topic keeps (messages, ms; 0 messages: no events).
-- The operation's own arguments start at ARGV[6].
-- Time comes from Redis (TIME), never from a node's clock.

local op = ARGV[1]
local candidate = ARGV[2]
local meta_ttl = tonumber(ARGV[3])
local events_size = tonumber(ARGV[4])
local events_ttl = tonumber(ARGV[5])

-- Read once per call: a send to ten ids stamps them alike.
local now
local function now_ms()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end

local function stream_key(kind, name) return 'sb:s:' .. kind .. ':' .. name end
local function meta_key(kind, name) return 'sb:m:' .. kind .. ':' .. name end
local function channel(kind, name) return 'sb:c:' .. kind .. ':' .. name end

-- A stream's epoch and top offset, made (with a new epoch) when missing.
-- A stream whose meta is gone lost its history: its old entries go too, so
-- offsets under the new epoch start again from 1.
local function position(kind, name)
  local mkey = meta_key(kind, name)
  local meta = redis.call('HMGET', mkey, 'e', 't')
  if not meta[1] then
    redis.call('DEL', stream_key(kind, name))
    redis.call('HSET', mkey, 'e', candidate, 't', 0)
    meta = { candidate, 0 }
  end
  redis.call('PEXPIRE', mkey, meta_ttl)
  return meta[1], tonumber(meta[2])
end

-- Appends a message and tells the nodes, in one step. The entry's id is its
-- offset, so the stream itself says which offsets it still holds.
local function append(kind, name, size, ttl, from, payload)
  local epoch = position(kind, name)
  local offset = redis.call('HINCRBY', meta_key(kind, name), 't', 1)
  local skey = stream_key(kind, name)
  redis.call('XADD', skey, 'MAXLEN', size, offset .. '-0',
    'p', payload, 'f', from, 'a', now_ms())
  redis.call('PEXPIRE', skey, ttl)
  redis.call('PUBLISH', channel(kind, name),
    'm|' .. epoch .. '|' .. offset .. '|' .. from .. '|' .. payload)
  return epoch, offset
end

-- Passes the entries of stream `skey` from `from` on (newest first with
-- `newest`, from `+`), at most `limit`, to `take` until it returns false.
-- Read in chunks that grow, so that big entries stop a caller's budget
-- before many are held.
local function scan(skey, from, newest, limit, take)
  local count, seen = 8, 0
  while seen < limit do
    local want = math.min(count, limit - seen)
    local chunk
    if newest then
      chunk = redis.call('XREVRANGE', skey, from, '-', 'COUNT', want)
    else
      chunk = redis.call('XRANGE', skey, from, '+', 'COUNT', want)
    end
    for _, entry in ipairs(chunk) do
      seen = seen + 1
      if not take(entry) then return end
    end
    if #chunk < want then return end
    from = '(' .. chunk[#chunk][1]
    count = math.min(count * 2, 1024)
  end
end

-- An entry's bytes, as budgets count them: its fields' values.
local function size_of(entry)
  local size = 0
  for i = 2, #entry[2], 2 do size = size + #entry[2][i] end
  return size
end

-- The stream's position, the time, and the entries after `since` (up to
-- `limit`), or the latest `limit` (newest first) when `since` is empty;
-- fewer once their fields pass `budget` bytes, but never none.
local function read(kind, name, since, limit, budget)
  local epoch, top = position(kind, name)
  local entries = {}
  if limit == 0 or (since ~= '' and tonumber(since) >= top) then
    return { epoch, top, now_ms(), entries }
  end
  local newest = since == ''
  local from = newest and '+' or (tonumber(since) + 1) .. '-0'
  local bytes = 0
  scan(stream_key(kind, name), from, newest, limit, function(entry)
    local size = size_of(entry)
    if #entries > 0 and bytes + size > budget then return false end
    bytes = bytes + size
    entries[#entries + 1] = entry
    return true
  end)
  return { epoch, top, now_ms(), entries }
end

-- What a resume from `since` under `since_epoch` replays, as `read` answers
-- it. The node recovers a resume only with every entry after `since`, within
-- its budget; so that one it would refuse moves no entries, this answers
-- none under another epoch, for more missed than `limit`, when the stream no
-- longer holds the entry right after `since`, or once the entries' fields
-- pass `budget` bytes (fewer than the node counts of their frames).
local function resume(kind, name, since, since_epoch, limit, budget)
  local epoch, top = position(kind, name)
  since = tonumber(since)
  if since_epoch ~= epoch or since >= top or top - since > limit then
    return { epoch, top, now_ms(), {} }
  end
  local first = (since + 1) .. '-0'
  local entries, bytes, whole = {}, 0, true
  scan(stream_key(kind, name), first, false, limit, function(entry)
    bytes = bytes + size_of(entry)
    whole = (#entries > 0 or entry[1] == first) and bytes <= budget
    if whole then entries[#entries + 1] = entry end
    return whole
  end)
  if not whole then entries = {} end
  return { epoch, top, now_ms(), entries }
end

-- First online / last offline, on the `$clients` topic.
local function client_event(id, event)
  if events_size > 0 then
    append('t', '$clients', events_size, events_ttl, '',
      '{"client":"' .. id .. '","event":"' .. event .. '"}')
  end
end

local function node_clients(node) return 'sb:n:' .. node .. ':c' end
local function node_topics(node) return 'sb:n:' .. node .. ':t' end

-- Takes `count` connections of `id` off the cluster's count.
local function clients_down(id, count)
  local left = redis.call('HINCRBY', 'sb:clients', id, -count)
  if left <= 0 then
    redis.call('HDEL', 'sb:clients', id)
    client_event(id, 'offline')
  end
end

-- Takes `count` subscribed connections of `client` off `topic`.
local function topic_down(topic, client, count)
  if redis.call('HINCRBY', 'sb:topics', topic, -count) <= 0 then
    redis.call('HDEL', 'sb:topics', topic)
  end
  if redis.call('HINCRBY', 'sb:p:' .. topic, client, -count) <= 0 then
    redis.call('HDEL', 'sb:p:' .. topic, client)
    redis.call('PUBLISH', channel('t', topic), 'l|' .. client)
  end
end

-- A node's index holds one field per connection (`ID\nTOKEN`) and per
-- subscription (`TOPIC\nCLIENT\nTOKEN`): counting and undoing are keyed by
-- the field, so a call sent twice counts once, and a leave for something
-- never counted (or already reaped) does nothing.
local function split(field)
  local first = string.find(field, '\n', 1, true)
  local last = first
  while true do
    local next = string.find(field, '\n', last + 1, true)
    if not next then break end
    last = next
  end
  return string.sub(field, 1, first - 1), string.sub(field, first + 1, last - 1)
end

-- Index fields a heartbeat undoes at most, over every dead node: Redis runs
-- nothing else while a script runs, and undoing a node of 100,000 connections
-- and 50,000 subscriptions in one call held it for 1.5 s, past the heartbeats
-- of every other node. A beat of 2,000 takes about 24 ms (10 ms without
-- `$clients` events; bench/reap.sh); a bigger index takes more beats.
local REAP_BATCH = 2000
-- How long a buried node's id is kept from coming back (ms): far past any
-- beat still in flight.
local DEAD_TTL = 3600000

-- A node whose lease has lapsed leaves `sb:nodes` at once (it may count
-- nothing more: `alive`) for `sb:reaping`, and its figures go.
local function bury(node)
  redis.call('ZREM', 'sb:nodes', node)
  redis.call('DEL', 'sb:n:' .. node .. ':s')
  redis.call('SADD', 'sb:reaping', node)
  -- Outlives the reaping, which a small index finishes in this same call:
  -- a first beat of this id that comes late (sent again after its answer
  -- was lost) must not bring it back with nothing counted.
  redis.call('SET', 'sb:dead:' .. node, 1, 'PX', DEAD_TTL)
end

-- Undoes up to `budget` fields of what a dead node counted; answers what is
-- left of the budget. Each index is walked with HSCAN from where the last
-- step stopped (`sb:reaping:at`), and each field goes from it as it is
-- undone, by the call that deletes it, so nothing is undone twice. The node
-- leaves `sb:reaping` in the call that empties both indexes.
local function reap(node, budget)
  for _, key in ipairs({ node_clients(node), node_topics(node) }) do
    while budget > 0 and redis.call('EXISTS', key) == 1 do
      local at = redis.call('HGET', 'sb:reaping:at', key) or '0'
      local step = redis.call('HSCAN', key, at, 'COUNT', math.min(budget, 1000))
      local flat = step[2]
      for i = 1, #flat, 2 do
        if redis.call('HDEL', key, flat[i]) == 1 then
          local id, client = split(flat[i])
          if key == node_clients(node) then
            clients_down(id, 1)
          else
            topic_down(id, client, 1)
          end
        end
      end
      -- A step that found only empty buckets still costs something.
      budget = budget - math.max(#flat / 2, 10)
      if step[1] == '0' then
        redis.call('HDEL', 'sb:reaping:at', key)
      else
        redis.call('HSET', 'sb:reaping:at', key, step[1])
      end
    end
  end
  if redis.call('EXISTS', node_clients(node), node_topics(node)) == 0 then
    redis.call('SREM', 'sb:reaping', node)
    redis.call('HDEL', 'sb:reaping:at', node_clients(node), node_topics(node))
  end
  return budget
end

-- A node whose lease has lapsed was reaped (or is about to be): it must
-- count nothing more under its id.
local function alive(node)
  return redis.call('ZSCORE', 'sb:nodes', node) ~= false
end

-- An API call's Idempotency-Key: its first answer, if it ran in the last
-- five minutes (through any node).
local function remembered(key)
  if key == '' then return nil end
  local seen = redis.call('GET', 'sb:idem:' .. key)
  if seen then
    -- Marked, so the node does not count it as appended again.
    local answer = cjson.decode(seen)
    table.insert(answer, 'again')
    return answer
  end
  return nil
end

local function remember(key, answer)
  if key ~= '' then
    redis.call('SET', 'sb:idem:' .. key, cjson.encode(answer), 'PX', 300000)
  end
  return answer
end

if op == 'send' then
  -- ARGV: key ('' for none), size, ttl, from, payload, id...
  local key = ARGV[6]
  local again = remembered(key)
  if again then return again end
  local size, ttl, from, payload = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
  -- Each target is named in the answer: a retry replays it whatever its
  -- own targets (their order, or their number) are.
  local out = {}
  for i = 11, #ARGV do
    local epoch, offset = append('i', ARGV[i], size, ttl, from, payload)
    local online = redis.call('HGET', 'sb:clients', ARGV[i]) or 0
    table.insert(out, ARGV[i])
    table.insert(out, epoch)
    table.insert(out, offset)
    table.insert(out, tonumber(online))
  end
  return remember(key, out)
elseif op == 'publish' then
  -- ARGV: key ('' for none), topic, size (0: no history), ttl, from, payload
  local key = ARGV[6]
  local again = remembered(key)
  if again then return again end
  local topic, size, ttl, from, payload = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10], ARGV[11]
  local subscribers = tonumber(redis.call('HGET', 'sb:topics', topic) or 0)
  if size == 0 then
    -- Not stored. While the topic has a position (another node keeps its
    -- history: a rolling deploy that turns it on or off), the message still
    -- takes the next offset, unstored: that node's subscribers get it in
    -- order, and a resume across it finds the hole and is told
    -- recovered:false, never recovered without it.
    local mkey = meta_key('t', topic)
    local epoch, offset = redis.call('HGET', mkey, 'e'), 0
    if epoch then
      offset = redis.call('HINCRBY', mkey, 't', 1)
    else
      epoch = ''
    end
    redis.call('PUBLISH', channel('t', topic),
      'm|' .. epoch .. '|' .. offset .. '|' .. from .. '|' .. payload)
    return remember(key, { '', 0, subscribers })
  end
  local epoch, offset = append('t', topic, size, ttl, from, payload)
  return remember(key, { epoch, offset, subscribers })
elseif op == 'connect' then
  -- ARGV: node, id, token, since offset and epoch ('' for none), limit
  -- (entries read), the id's connection limit, the replay's budget in bytes
  local node, id, token, since, since_epoch = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
  if not alive(node) then return redis.error_reply('REAPED node lease lapsed') end
  -- A `since` past the top under the inbox's epoch (Redis lost writes it
  -- had acknowledged) reads nothing: the node answers recovered:false.
  local field = id .. '\n' .. token
  if redis.call('HEXISTS', node_clients(node), field) == 0 then
    -- Checked and counted at once: connects racing on several nodes cannot
    -- all pass the limit. A call sent again is counted already.
    if tonumber(redis.call('HGET', 'sb:clients', id) or 0) >= tonumber(ARGV[12]) then
      return { 'full' }
    end
    redis.call('HSET', node_clients(node), field, 1)
    if redis.call('HINCRBY', 'sb:clients', id, 1) == 1 then
      client_event(id, 'online')
    end
  end
  if since == '' then return read('i', id, since, tonumber(ARGV[11]), 0) end
  return resume('i', id, since, since_epoch, tonumber(ARGV[11]), tonumber(ARGV[13]))
elseif op == 'leave' then
  -- ARGV: node, id, token
  local node, id, token = ARGV[6], ARGV[7], ARGV[8]
  if redis.call('HDEL', node_clients(node), id .. '\n' .. token) == 0 then return 0 end
  clients_down(id, 1)
  return 1
elseif op == 'join' then
  -- ARGV: node, topic, client, token, limit (0: none), history (0/1),
  -- since offset and epoch ('' for none), count, the replay's budget in bytes
  local node, topic, client, token = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
  local limit, history, since, since_epoch = tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13]
  if not alive(node) then return redis.error_reply('REAPED node lease lapsed') end
  local epoch, top
  if history == '1' then
    epoch, top = position('t', topic)
    if since ~= '' and since_epoch == epoch and tonumber(since) > top then
      return { 'ahead', top }
    end
  end
  local field = topic .. '\n' .. client .. '\n' .. token
  local first = 0
  if redis.call('HEXISTS', node_topics(node), field) == 0 then
    if limit > 0 and tonumber(redis.call('HGET', 'sb:topics', topic) or 0) >= limit then
      return { 'full' }
    end
    redis.call('HSET', node_topics(node), field, 1)
    redis.call('HINCRBY', 'sb:topics', topic, 1)
    if redis.call('HINCRBY', 'sb:p:' .. topic, client, 1) == 1 then
      redis.call('PUBLISH', channel('t', topic), 'j|' .. client)
      first = 1
    end
  end
  if history == '1' then
    local entries = {}
    if since ~= '' then
      entries = resume('t', topic, since, since_epoch, tonumber(ARGV[14]), tonumber(ARGV[15]))[4]
    end
    return { 'ok', first, epoch, top, now_ms(), entries }
  end
  return { 'ok', first }
elseif op == 'part' then
  -- ARGV: node, topic, client, token
  local node, topic, client, token = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
  if redis.call('HDEL', node_topics(node), topic .. '\n' .. client .. '\n' .. token) == 0 then
    return 0
  end
  topic_down(topic, client, 1)
  return 1
elseif op == 'heartbeat' then
  -- ARGV: node, lease (ms), first (1 on a node's first beat), 7 traffic figures
  local node, lease, first = ARGV[6], tonumber(ARGV[7]), ARGV[8]
  if first ~= '1' and not alive(node) then
    return redis.error_reply('REAPED node lease lapsed')
  end
  -- A first beat that counted in Redis but whose answer was lost, then a
  -- lease without a beat: the id is being reaped, and would keep losing
  -- what it counts from now on. It takes a new id.
  if first == '1' and (redis.call('SISMEMBER', 'sb:reaping', node) == 1
      or redis.call('EXISTS', 'sb:dead:' .. node) == 1) then
    return redis.error_reply('REAPED node lease lapsed')
  end
  local time = now_ms()
  redis.call('ZADD', 'sb:nodes', time + lease, node)
  -- Its traffic, for the other nodes' stats (ARGV[9..15]).
  local skey = 'sb:n:' .. node .. ':s'
  for i = 9, 15 do redis.call('HSET', skey, i - 8, ARGV[i]) end
  redis.call('PEXPIRE', skey, lease * 2)
  local dead = redis.call('ZRANGEBYSCORE', 'sb:nodes', '-inf', time, 'LIMIT', 0, 16)
  for _, n in ipairs(dead) do bury(n) end
  local budget = REAP_BATCH
  for _, n in ipairs(redis.call('SMEMBERS', 'sb:reaping')) do
    budget = reap(n, budget)
    if budget <= 0 then break end
  end
  return #dead
elseif op == 'read' then
  -- ARGV: kind, name, since ('' for the latest), limit, bytes at most (a
  -- page of the history API, or a node's gap fill)
  return read(ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]))
elseif op == 'connections' then
  -- ARGV: id...
  local out = {}
  for i = 6, #ARGV do
    table.insert(out, tonumber(redis.call('HGET', 'sb:clients', ARGV[i]) or 0))
  end
  return out
elseif op == 'presence' then
  -- ARGV: topic, cursor ('0': the first page), most client ids
  -- Answers the topic's subscribers, the next page's cursor ('0': none) and
  -- up to `most` ids with their connections, flattened: a bounded step
  -- however big the topic. An HSCAN step gathers whole buckets until it has
  -- COUNT ids, so it may overshoot; each asks for half the room left, and a
  -- step that would still overfill the page is left for the next page (from
  -- the same cursor). Only a page's first step is taken whatever its size: a
  -- compact (listpack) hash, which Redis gives whole, or, for a `most` of a
  -- few ids, a bucket holding more than half of them.
  local topic, cursor, most = ARGV[6], ARGV[7], tonumber(ARGV[8])
  local key, flat = 'sb:p:' .. topic, {}
  for _ = 1, 64 do
    local room = most - #flat / 2
    local step = redis.call('HSCAN', key, cursor, 'COUNT', math.max(1, math.floor(room / 2)))
    if #flat > 0 and #step[2] > room * 2 then break end
    for _, v in ipairs(step[2]) do flat[#flat + 1] = v end
    cursor = step[1]
    if cursor == '0' or #flat >= most * 2 then break end
  end
  return { tonumber(redis.call('HGET', 'sb:topics', topic) or 0), cursor, flat }
elseif op == 'nodes' then
  -- ARGV: node (left out: it adds its own, current figures)
  -- Answers each other node's id and its 7 figures, one after another.
  local out = {}
  for _, n in ipairs(redis.call('ZRANGE', 'sb:nodes', 0, -1)) do
    if n ~= ARGV[6] then
      table.insert(out, n)
      local f = redis.call('HMGET', 'sb:n:' .. n .. ':s', 1, 2, 3, 4, 5, 6, 7)
      for i = 1, 7 do table.insert(out, tonumber(f[i] or 0)) end
    end
  end
  return out
elseif op == 'topics' then
  -- ARGV: most topics, most client ids each
  -- Reads one HSCAN page of the topics (about 1000: all of them, up to
  -- there), so a cluster with many topics costs Redis one bounded step; the
  -- biggest of that page are answered: HLEN, then each topic's name,
  -- subscribers, and its ids with their connections (flattened).
  local limit, members = tonumber(ARGV[6]), tonumber(ARGV[7])
  local page = redis.call('HSCAN', 'sb:topics', 0, 'COUNT', 1000)[2]
  local topics = {}
  for i = 1, #page, 2 do table.insert(topics, { page[i], tonumber(page[i + 1]) }) end
  table.sort(topics, function(a, b)
    if a[2] ~= b[2] then return a[2] > b[2] end
    return a[1] < b[1]
  end)
  local out = { redis.call('HLEN', 'sb:topics') }
  for i = 1, math.min(limit, #topics) do
    local ids = redis.call('HSCAN', 'sb:p:' .. topics[i][1], 0, 'COUNT', members)[2]
    local flat = {}
    for j = 1, math.min(#ids, members * 2) do flat[j] = ids[j] end
    table.insert(out, { topics[i][1], topics[i][2], flat })
  end
  return out
elseif op == 'counts' then
  return { redis.call('HLEN', 'sb:clients'), redis.call('HLEN', 'sb:topics'),
    redis.call('ZCARD', 'sb:nodes') }
elseif op == 'touch' then
  -- ARGV: kind, name, kind, name...: streams a node has clients on, whose
  -- positions must outlive a quiet spell. A position already gone stays gone.
  for i = 6, #ARGV - 1, 2 do
    redis.call('PEXPIRE', meta_key(ARGV[i], ARGV[i + 1]), meta_ttl)
  end
  return 0
elseif op == 'disconnect' then
  -- ARGV: id, code, reason
  local id = ARGV[6]
  redis.call('PUBLISH', channel('i', id), 'x|' .. ARGV[7] .. '|' .. ARGV[8])
  return tonumber(redis.call('HGET', 'sb:clients', id) or 0)
end
return redis.error_reply('ERR unknown switchboard operation ' .. op)
